"""Checks that run the exported artifacts: `verify` (rank files through the reference runtime vs
the source). They sit above the runtime, which sits above the formats, so no format imports them."""

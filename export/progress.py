"""Progress bars for long work: bytes/s for weight streams, items for layer loops."""

from __future__ import annotations

import sys

from tqdm import tqdm


def byte_progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                mininterval=0.5, file=sys.stderr, disable=not enabled, leave=False)


def item_progress(total: int, desc: str, unit: str = "layer", enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5, file=sys.stderr,
                disable=not enabled, leave=False)

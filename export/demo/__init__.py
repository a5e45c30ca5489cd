"""The shipped demo model: a tiny Python-code LLM and its Puzzle-style (attention-pruned) child.

Without a model hub the toolkit needs a real trained checkpoint whose layers behave like an LLM's,
so analysis, quality numbers and generated text mean something. `python -m export.demo.train`
reproduces both shipped checkpoints (`export.demo.paths.DEMO_LLAMA`, `DEMO_PUZZLE`).
"""

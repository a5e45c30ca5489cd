"""Where the shipped demo checkpoints live inside the installed package."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEMO_LLAMA = MODELS_DIR / "llama"  # unpruned: every layer has attention (DeciLM config, varying widths)
DEMO_PUZZLE = MODELS_DIR / "puzzle"  # Puzzle-style: a contiguous run of FFN-only (attention-free) layers

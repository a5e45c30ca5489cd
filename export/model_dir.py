"""What a path given for a model holds: config.json, an HF checkpoint, our TRT-LLM checkpoint, or an
`engines/NAME` directory (which stands for its checkpoint, `EngineDir.checkpoint`).

One answer for every command, so `inspect engines/NAME` works where `generate` and `verify` do.
Only config files are read here (no torch), so `inspect` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from export.engine_dir import weights_dir
from export.spec import ModelSpec


def is_trtllm_checkpoint(path: Path) -> bool:
    """TRT-LLM's config.json has a top-level "architecture" (HF's says "architectures")."""
    cfg = path / "config.json"
    if not cfg.is_file() or not (path / "rank0.safetensors").is_file():
        return False
    try:
        return "architecture" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_spec(path: str | Path) -> ModelSpec:
    """The model description of any of the paths above."""
    path = weights_dir(path)
    if path.is_dir() and is_trtllm_checkpoint(path):
        from export.trtllm.config import read_trtllm_config

        return read_trtllm_config(path)[0]
    return ModelSpec.load(path)

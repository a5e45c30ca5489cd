"""Shared fixtures for the TRT-LLM tests: tiny source checkpoints and TRT-LLM's own algorithm."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from export.synthetic import write_random_checkpoint

TOKENIZER_JSON = '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}'


def make_source(path: Path, spec, *, seed: int = 1, shard_bytes: int = 400_000) -> Path:
    """A multi-file HF checkpoint with tokenizer files beside it."""
    src = write_random_checkpoint(path, spec, seed=seed, max_shard_bytes=shard_bytes)
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    (src / "tokenizer_config.json").write_text('{"bos_token": "a"}')
    (src / "generation_config.json").write_text('{"bos_token_id": 1}')
    return src


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def rank_tensors(ckpt: Path, rank: int) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / f"rank{rank}.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118

"""`engines/NAME` as one object: where its checkpoint, tokenizer, ONNX graph and HF source are.

Every command and backend asks an `EngineDir` (backed by the directory's manifest) instead of
working the paths out itself, so there is one answer to "where is X of this engine directory",
and a manifest that names another place is obeyed everywhere at once.
"""

from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path

from export.errors import ExportError
from export.manifest import MANIFEST, Manifest
from export.quantization import NONE, Quantization, parse_quantization

ONNX_DIR = "onnx"  # engines/NAME/onnx unless the manifest's engines.onnx says otherwise
ONNX_MODEL = "model.onnx"


class EngineDir:
    """An `engines/NAME` directory: the manifest is read once, on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @staticmethod
    def holds_manifest(path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def of(cls, path: str | Path) -> EngineDir | None:
        """The engine directory `path` is, or None (an HF or bare TRT-LLM checkpoint)."""
        return cls(path) if cls.holds_manifest(path) else None

    @classmethod
    def around(cls, path: str | Path) -> EngineDir | None:
        """The engine directory `path` is or lies directly in (engines/NAME/checkpoint), or None."""
        path = Path(path)
        return cls.of(path) or cls.of(path.parent)

    @cached_property
    def manifest(self) -> Manifest:
        return Manifest.load(self.path)

    @property
    def checkpoint(self) -> Path:
        """The TRT-LLM checkpoint (config.json + rank files): what the cpu engine runs."""
        return self.path / self.manifest.checkpoint

    @property
    def quantization(self) -> Quantization:
        """What the manifest records of the checkpoint's quantization (FP8 weights, FP8 KV cache),
        NONE when it records none. `package` checks it against the checkpoint's own description."""
        body = self.manifest.quantization
        if body is None:
            return NONE
        return parse_quantization({"quantization": body}, None, str(self.path / MANIFEST),
                                  f"{self.path / MANIFEST} quantization")

    @staticmethod
    def quantization_record(quant: Quantization) -> dict | None:
        """The manifest's `quantization` for `quant` (what `convert` / `quantize` write)."""
        return None if quant.is_none else quant.hf_quant_config()["quantization"]

    @property
    def tokenizer(self) -> Path | None:
        """The tokenizer `convert` copied; None when the source had none."""
        name = self.manifest.tokenizer
        return self.path / name if name else None

    @property
    def onnx(self) -> Path:
        """Where the ONNX graph is (or `build --onnx` writes it)."""
        entry = self.manifest.engines.get("onnx", {})
        return self.path / entry.get("path", ONNX_DIR)

    @property
    def hf_source(self) -> Path:
        """The HF checkpoint this was converted from (manifest `source_path`); an error if it is gone."""
        source = Path(self.manifest.source_path)
        if not (source / "config.json").is_file():
            raise ExportError(f"{self.path} is an engine directory; its HF source {source} (manifest.json "
                              f"source_path) is gone: pass the HF checkpoint itself")
        return source

    def tp1_weights(self) -> Path:
        """Unsplit weights: the checkpoint if it is tp=1 pp=1, else the recorded source (never re-merged)."""
        m = self.manifest
        if m.mapping.world_size == 1:
            return self.checkpoint
        if Path(m.source_path).is_dir():
            return Path(m.source_path)
        raise ExportError(f"{self.path}: the checkpoint is split for tp={m.tp} pp={m.pp} and the source checkpoint "
                          f"{m.source_path} is gone; the ONNX graph needs tp=1 weights (convert again with --tp 1)")


def weights_dir(path: str | Path) -> Path:
    """What the weights of a path given for a model are: an engine directory stands for its checkpoint."""
    engine = EngineDir.of(path)
    if engine is not None and (engine.path / engine.manifest.checkpoint).is_dir():
        return engine.checkpoint
    return Path(path)


def hf_checkpoint(path: str | Path) -> Path:
    """The HF checkpoint a command that rewrites weights (convert, fuse) reads: the path itself, or
    for an engine directory the HF checkpoint it was converted from, so every command takes an
    engine directory where a checkpoint is expected."""
    engine = EngineDir.of(path)
    if engine is None or not engine.checkpoint.is_dir():
        return Path(path)
    source = engine.hf_source
    print(f"{path} is an engine directory: reading the HF checkpoint it came from, {source}", file=sys.stderr)
    return source


def onnx_dir(source: str | Path) -> Path:
    """The ONNX graph for `source`: the directory itself, or its engine directory's (for
    engines/NAME or engines/NAME/checkpoint), or SOURCE/onnx."""
    source = Path(source)
    engine = EngineDir.around(source)
    places = [source, engine.onnx if engine is not None else source / ONNX_DIR]
    for d in places:
        if (d / ONNX_MODEL).is_file():
            return d
    raise ExportError(f"{source}: no ONNX graph ({ONNX_MODEL}) here or in {places[1]}; "
                      f"create it with `python -m export build engines/NAME --onnx`")

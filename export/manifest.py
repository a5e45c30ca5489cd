"""`engines/NAME/manifest.json`: what was built from what, so later stages read instead of guess.

Written by `convert` (source path + content hash, layout, dtype, the CPU engine = the checkpoint),
updated by `verify` (engines.cpu.verified) and `build` (engines.trtllm, only when it succeeded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from export import __version__
from export.errors import ExportError
from export.io.atomic import atomic_write_text
from export.mapping import Mapping

MANIFEST = "manifest.json"
DEFAULT_BUILD = {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 8192}


@dataclass(kw_only=True)
class Manifest:
    toolkit_version: str = __version__
    source_path: str
    source_sha256: str
    fusion_plan: dict | None = None
    tp: int
    pp: int
    dtype: str
    checkpoint: str = "checkpoint"  # relative to engines/NAME
    tokenizer: str | None = "tokenizer"  # relative to engines/NAME; None if the source had none
    engines: dict[str, dict] = field(default_factory=dict)  # only engines that exist
    # the checkpoint's quantization as hf_quant_config.json's "quantization" body (quant_algo,
    # kv_cache_quant_algo, exclude_modules); None: unquantized, or a manifest from before FP8
    quantization: dict | None = None
    build: dict = field(default_factory=lambda: dict(DEFAULT_BUILD))

    @property
    def mapping(self) -> Mapping:
        return Mapping(self.tp, self.pp)

    @classmethod
    def load(cls, engine_dir: Path) -> Manifest:
        path = Path(engine_dir) / MANIFEST
        if not path.is_file():
            raise ExportError(f"{engine_dir}: no {MANIFEST}; create it with `python -m export convert CKPT "
                              f"--tp N --out {engine_dir}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: not valid JSON ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise ExportError(f"{path}: " + "; ".join(
                [f"required field {k!r} is missing" for k in missing] + [f"unknown field {k!r}" for k in unknown]))
        return cls(**data)

    def save(self, engine_dir: Path) -> None:
        atomic_write_text(Path(engine_dir) / MANIFEST, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    def path_of(self, engine_dir: Path, engine: str) -> Path:
        if engine not in self.engines:
            raise ExportError(f"{engine_dir}: no {engine!r} engine (have: {', '.join(self.engines) or 'none'})")
        return Path(engine_dir) / self.engines[engine]["path"]


def tree_sha256(path: Path, known: dict[str, bytes] | None = None) -> str:
    """Content hash of a checkpoint directory: every file's sha256, with its relative path.

    Hidden files are skipped. `known` holds digests (by relative path) already computed from bytes
    read for another purpose, e.g. by the converter's pass, so those files are not read again.
    """
    root = Path(path)
    total = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        rel = p.relative_to(root).as_posix()
        digest = (known or {}).get(rel) or file_sha256(p)
        total.update(rel.encode() + b"\0" + digest)
    return total.hexdigest()


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.digest()

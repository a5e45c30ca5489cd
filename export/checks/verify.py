"""`verify`: the exported rank files, run by the reference runtime at their own tp/pp, must give
the source checkpoint's logits (run at tp = 1).

The runtime reads the rank files through `export.sources` (the TRT-LLM format), so this checks exactly the bytes
TRT-LLM would load: names, local layer indices, the qkv packing, kv duplication, the padded
lm_head. Both sides compute in fp32. When every source value is exactly representable in the
checkpoint's dtype (the same dtype, or a widening such as bf16 -> fp32) the difference must be
<= tol (1e-4); only a narrowing cast (e.g. fp32 -> bf16) is lossy: it is reported, and passes when
the difference stays within a fraction of the logits' range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from export.engine_dir import EngineDir
from export.errors import ExportError
from export.spec import ModelSpec, casts_exactly

LOSSY_FRACTION = 0.05  # of max |logit|, only when the checkpoint's dtype cannot hold every source value


@dataclass(frozen=True)
class VerifyResult:
    engine_dir: Path
    tp: int
    pp: int
    source_dtype: str
    dtype: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    seconds: float

    @property
    def lossless(self) -> bool:
        return casts_exactly(self.source_dtype, self.dtype)

    def to_json(self) -> dict:
        return {"engine_dir": str(self.engine_dir), "tp": self.tp, "pp": self.pp, "source_dtype": self.source_dtype,
                "dtype": self.dtype, "lossless": self.lossless, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "passed": self.passed, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        kind = ("same dtype as the source" if self.source_dtype == self.dtype
                else f"{self.source_dtype} source -> {self.dtype}, {'exact' if self.lossless else 'lossy'}")
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {self.engine_dir} at tp={self.tp} pp={self.pp} ({kind}): max |logits diff| vs the "
                f"source at tp=1 = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}) in {self.seconds:.1f} s")


def sample_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """A ragged batch of seeded token ids (exercises right padding)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (11, 5, 8)]


def _same_model(a: ModelSpec, b: ModelSpec) -> list[str]:
    fields = ("hidden", "heads", "head_dim", "vocab", "layers", "rope_theta", "rope_scaling", "norm_eps")
    return [f for f in fields if getattr(a, f) != getattr(b, f)]


def verify(engine_dir: Path, against: Path, *, tol: float = 1e-4, threads: int = 1) -> VerifyResult:
    """Compare logits, record the outcome in the manifest (`engines.cpu`), return it."""
    from export.runtime.engine import Engine
    from export.sources import open_source

    engine_dir, against = Path(engine_dir), Path(against)
    engine = EngineDir(engine_dir)
    manifest = engine.manifest
    source_spec = open_source(against)[0]  # the reference's config and weight headers, checked before any run
    start = time.perf_counter()
    with Engine.start(engine.checkpoint, dtype="float32", threads=threads) as eng:
        differs = _same_model(eng.spec, source_spec.widened())  # parallel blocks convert to wide FFNs
        if differs:
            raise ExportError(f"{engine_dir} was not converted from {against}: they differ in {', '.join(differs)}")
        prompts = sample_prompts(eng.spec.vocab)
        got = eng.logits(prompts)
    with Engine.start(against, tp=1, pp=1, dtype="float32") as ref_engine:
        want = ref_engine.logits(prompts)
    diff = max((got[i, :len(p)] - want[i, :len(p)]).abs().max().item() for i, p in enumerate(prompts))
    lossless = casts_exactly(source_spec.dtype, manifest.dtype)
    tolerance = tol if lossless else LOSSY_FRACTION * want.abs().max().item()
    res = VerifyResult(engine_dir, manifest.tp, manifest.pp, source_spec.dtype, manifest.dtype, diff, tolerance,
                       diff <= tolerance, time.perf_counter() - start)
    manifest.engines.setdefault("cpu", {"path": manifest.checkpoint})
    manifest.engines["cpu"].update({"verified": res.passed, "max_abs_diff": diff, "tolerance": tolerance,
                                    "verified_against": str(against.resolve())})
    manifest.save(engine_dir)
    return res

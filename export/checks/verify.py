"""`verify`: the exported rank files, run by the reference runtime at their own tp/pp, must give
the source checkpoint's logits (run at tp = 1).

The runtime reads the rank files through `export.sources` (the TRT-LLM format), so this checks exactly the bytes
TRT-LLM would load: names, local layer indices, the qkv packing, kv duplication, the padded
lm_head. Both sides compute in fp32. When every source value is exactly representable in the
checkpoint's dtype (the same dtype, or a widening such as bf16 -> fp32) the difference must be
<= tol (1e-4); only a narrowing cast (e.g. fp32 -> bf16) is lossy: it is reported, and passes when
the difference stays within a fraction of the logits' range.

An FP8 source runs the same way, both sides emulating TRT-LLM's per-tensor FP8 GEMMs and FP8 KV
cache, so the comparison stays strict. The reference is the source with q/k/v requantized as
convert had to for the shared qkv scale (`trtllm.packed_scales.RequantizedWeights`; nothing changes
when their scales are equal, as ModelOpt writes them); when it did, the result says so and reports
how far that moved the logits from the plain source. Given the unquantized model (`bf16_reference`),
it also reports the FP8 model's quality against it: perplexity, KL and top-1 agreement, computed
by `fusion.evaluate.compare_logits`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from export.engine_dir import EngineDir
from export.errors import ExportError
from export.mapping import Mapping
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
    fp8: dict | None = None  # FP8 source: quantization, requantization and (with a bf16 reference) quality

    @property
    def lossless(self) -> bool:
        return casts_exactly(self.source_dtype, self.dtype)

    def to_json(self) -> dict:
        return {"engine_dir": str(self.engine_dir), "tp": self.tp, "pp": self.pp, "source_dtype": self.source_dtype,
                "dtype": self.dtype, "lossless": self.lossless, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "passed": self.passed, "seconds": round(self.seconds, 3),
                **({"fp8": self.fp8} if self.fp8 else {})}

    def summary(self) -> str:
        kind = ("same dtype as the source" if self.source_dtype == self.dtype
                else f"{self.source_dtype} source -> {self.dtype}, {'exact' if self.lossless else 'lossy'}")
        verdict = "PASS" if self.passed else "FAIL"
        line = (f"{verdict}: {self.engine_dir} at tp={self.tp} pp={self.pp} ({kind}): max |logits diff| vs the "
                f"source at tp=1 = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}) in {self.seconds:.1f} s")
        return line + ("" if not self.fp8 else "\n" + _fp8_summary(self.fp8))


def _fp8_summary(f: dict) -> str:
    lines = [f"FP8 ({f['quantization']}), both sides emulated: " + (
        "q/k/v scales equal in every layer, no requantization (exact)" if not f["requantized_layers"] else
        f"q/k/v requantized to their max scale in layers {f['requantized_layers']} (max relative weight change "
        f"{f['max_relative_error']:.3g}); compared with the source requantized the same way; the plain source's "
        f"logits differ from that by {f['requant_logits_diff']:.3g}")]
    if "quality" in f:
        q = f["quality"]
        lines.append(f"FP8 vs {q['reference']} on {q['tokens']} tokens: perplexity {q['perplexity']:.3f} "
                     f"(reference {q['reference_perplexity']:.3f}), KL {q['kl']:.3g}, top-1 agreement "
                     f"{q['top1_agreement']:.2%}")
    return "\n".join(lines)


def sample_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """A ragged batch of seeded token ids (exercises right padding)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (11, 5, 8)]


def _same_model(a: ModelSpec, b: ModelSpec) -> list[str]:
    fields = ("hidden", "heads", "head_dim", "vocab", "layers", "rope_theta", "rope_scaling", "norm_eps")
    return [f for f in fields if getattr(a, f) != getattr(b, f)]


def quality_ids(vocab: int, seed: int = 1, rows: int = 4, length: int = 32):
    """Seeded token rows for the FP8-vs-bf16 figures (a rectangle: `compare_logits` takes batches)."""
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _fp8_reference(against: Path, prompts: list[list[int]]) -> tuple[list[torch.Tensor], dict]:
    """Logits of the FP8 source at tp=1, with q/k/v requantized as convert writes them, run in this
    process (each prompt alone, no cache); and what the requantization changed."""
    from export.runtime.model import load_decoder
    from export.sources import open_source
    from export.trtllm.packed_scales import RequantizedWeights

    src = open_source(against)
    weights = src.rank_weights(Mapping(), 0)
    requant = RequantizedWeights(weights, src.spec)
    with torch.inference_mode():
        dec = load_decoder(requant)
        want = [dec(torch.tensor([p]))[0] for p in prompts]
        info = {"quantization": src.spec.quant.describe(), **requant.measure().to_json(), "requant_logits_diff": 0.0}
        if requant.plan:
            plain = load_decoder(weights)
            info["requant_logits_diff"] = max(float((plain(torch.tensor([p]))[0] - w).abs().max())
                                              for p, w in zip(prompts, want))
    return want, info


def _quality(eng, reference: Path, vocab: int) -> dict:
    """FP8 rank files vs the unquantized model on the same tokens (`fusion.evaluate` metrics)."""
    from export.fusion.evaluate import compare_logits
    from export.runtime.engine import Engine

    ids = quality_ids(vocab)
    got = eng.logits(ids.tolist())
    with Engine.start(reference, tp=1, pp=1, dtype="float32") as ref:
        want = ref.logits(ids.tolist())
    ppl, kl, top1 = compare_logits([want], [got], ids, ids.shape[0])
    ref_ppl, _, _ = compare_logits([want], [want], ids, ids.shape[0])
    return {"reference": str(reference), "tokens": ids.numel(), "perplexity": ppl, "reference_perplexity": ref_ppl,
            "kl": kl, "top1_agreement": top1}


def verify(engine_dir: Path, against: Path, *, tol: float = 1e-4, threads: int = 1,
           bf16_reference: Path | None = None) -> VerifyResult:
    """Compare logits, record the outcome in the manifest (`engines.cpu`), return it.

    `bf16_reference`: the unquantized model an FP8 source was quantized from; adds the quality figures."""
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
        if (eng.spec.quant.fp8, eng.spec.quant.fp8_kv) != (source_spec.quant.fp8, source_spec.quant.fp8_kv):
            raise ExportError(f"{engine_dir} is {eng.spec.quant.describe()} but {against} is "
                              f"{source_spec.quant.describe()}: not converted from it")
        prompts = sample_prompts(eng.spec.vocab)
        got = eng.logits(prompts)
        quality = _quality(eng, Path(bf16_reference), eng.spec.vocab) if bf16_reference is not None else None
    fp8 = None
    if source_spec.quant.is_none:
        with Engine.start(against, tp=1, pp=1, dtype="float32") as ref_engine:
            want = list(ref_engine.logits(prompts))
    else:
        want, fp8 = _fp8_reference(against, prompts)
        if quality is not None:
            fp8["quality"] = quality
    diff = max((got[i, :len(p)] - want[i][:len(p)]).abs().max().item() for i, p in enumerate(prompts))
    lossless = casts_exactly(source_spec.dtype, manifest.dtype)
    tolerance = tol if lossless else LOSSY_FRACTION * max(w.abs().max().item() for w in want)
    res = VerifyResult(engine_dir, manifest.tp, manifest.pp, source_spec.dtype, manifest.dtype, diff, tolerance,
                       diff <= tolerance, time.perf_counter() - start, fp8)
    manifest.engines.setdefault("cpu", {"path": manifest.checkpoint})
    manifest.engines["cpu"].update({"verified": res.passed, "max_abs_diff": diff, "tolerance": tolerance,
                                    "verified_against": str(against.resolve())})
    if fp8:
        manifest.engines["cpu"]["fp8"] = {**manifest.engines["cpu"].get("fp8", {}), **fp8}
    manifest.save(engine_dir)
    return res

"""`quantize`: a bf16/fp32 HF checkpoint -> a ModelOpt-format per-tensor FP8 HF checkpoint.

Everything that can refuse the job (the source and its side files, the quantization asked for,
both texts, the output path) is checked before the output exists. Then: calibrate on the
reference runtime one layer at a time (`runtime.layerwise`), compute the scales (`calibrate.fp8_scales`),
stream every tensor into the output (FP8 weights quantized row chunk by row chunk at their
final scale, everything else copied in the source dtype, each scale a float32 scalar beside its
weight), keep the source's side files, config keys and remote code, re-read what was written
through the validated reader, and score it against the source on held-out text with `evaluate`.
The output is written under the output policy (`export.io.output`: temp dir + rename).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export import fp8
from export.errors import ExportError
from export.fusion.calib import token_batch
from export.fusion.evaluate import Score, evaluate
from export.hf_code import install_remote_code
from export.io.output import check_output, output_dir
from export.io.paths import checkpoint_file
from export.io.reader import CheckpointReader
from export.io.safetensors_format import torch_dtype
from export.io.tokenizer import load_tokenizer
from export.io.writer import HFCheckpointWriter, copy_sidecars, sidecar_files, write_config, write_quant_config
from export.mapping import Mapping
from export.progress import byte_progress
from export.quantization import FP8, Quantization
from export.quantize.calibrate import Amaxes, fp8_linears, fp8_scales, row_chunks, weight_amaxes
from export.rank_weights import HFRankWeights
from export.sources import detect
from export.spec import ModelSpec, read_config_json
from export.tensors import (
    LINEAR_ROLES,
    Role,
    ScaleKind,
    ScaleRef,
    is_fp8,
    model_tensors,
    module_name,
    stored_dtype,
)

DEFAULT_EXCLUDE = ("lm_head",)  # as NVIDIA's FP8 Ultra and ModelOpt's default config leave it
KV_CACHE = {"fp8": FP8}  # --kv-cache value -> kv_cache_quant_algo
REPORT = "quantize_report.json"


@dataclass
class QuantizeResult:
    out: Path
    spec: ModelSpec  # the written (quantized) description
    scales: dict[ScaleRef, float]
    scores: list[Score] | None  # [source, FP8] on the held-out text; None without one
    report: dict[str, Any]


# ---- what is asked --------------------------------------------------------------------------
def quantization_for(spec: ModelSpec, kv_cache: str | None, exclude: tuple[str, ...]) -> Quantization:
    """The quantization to write; a tied lm_head (the embedding's bytes) cannot be FP8, so it is
    listed as excluded, as a loader must leave it in the model dtype."""
    if kv_cache is not None and kv_cache.lower() not in KV_CACHE:
        raise ExportError(f"--kv-cache {kv_cache!r}: only 'fp8' (an FP8 KV cache with calibrated k/v scales) "
                          f"is supported; leave it out for a KV cache in the model dtype")
    exclude = tuple(dict.fromkeys(exclude))
    quant = Quantization(FP8, KV_CACHE[kv_cache.lower()] if kv_cache else None, exclude)
    if spec.tie_embeddings and not quant.excludes("lm_head"):
        quant = Quantization(quant.algo, quant.kv_cache, (*exclude, "lm_head"))
    return quant


def _check_source(source: Path, follow_symlinks: bool | None) -> tuple[ModelSpec, CheckpointReader]:
    path, fmt = detect(source)
    if fmt.name != "hf" or path != source:
        raise ExportError(f"{source}: a {fmt.name} checkpoint; quantize reads an HF checkpoint (safetensors + "
                          f"config.json)")
    checkpoint_file(path, "config.json", follow_symlinks=follow_symlinks)
    spec = ModelSpec.load(path)
    if not spec.quant.is_none:
        raise ExportError(f"{path}: already quantized ({spec.quant.describe()}); quantize reads a bf16, fp16 or "
                          f"fp32 checkpoint")
    reader = CheckpointReader(path, follow_symlinks=follow_symlinks)
    reader.validate(spec)
    return spec, reader


def _text_tokens(path: str | Path, flag: str, tok: Any, vocab: int, tokens: int, seq_len: int) -> torch.Tensor:
    try:
        return token_batch(path, tok, vocab, tokens, seq_len)
    except ExportError as e:
        raise ExportError(f"{flag} {path}: {e}") from None


def _same_text(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# ---- writing ------------------------------------------------------------------------------
def _plan(spec: ModelSpec, scales: dict[ScaleRef, float]) -> tuple[list[tuple], dict[tuple, list[ScaleRef]]]:
    """Every tensor in checkpoint order, each weight followed by its scales (as ModelOpt's state
    dict has them: `q_proj.weight`, `q_proj.weight_scale`, `q_proj.input_scale`, `k_proj.k_scale`)."""
    beside: dict[tuple, list[ScaleRef]] = defaultdict(list)
    for s in scales:
        beside[(s.role, s.layer, s.branch)].append(s)
    plan = []
    for ref in model_tensors(spec):
        plan.append((ref.hf_name, torch_dtype(stored_dtype(spec, ref)), ref.shape))
        plan += [(s.name, torch.float32, ()) for s in beside[(ref.role, ref.layer, ref.branch)]]
    assert len(plan) == len(model_tensors(spec)) + len(scales), "a scale with no weight beside it"
    return plan, beside


def write_fp8_tensors(directory: Path, reader: CheckpointReader, spec: ModelSpec, scales: dict[ScaleRef, float],
                      max_shard_bytes: int, progress: bool = True) -> int:
    """Stream every tensor of the quantized description `spec` into `directory`; returns bytes."""
    plan, beside = _plan(spec, scales)
    writer = HFCheckpointWriter(directory, plan, max_shard_bytes)
    bar = byte_progress(writer.total_bytes, "quantize", enabled=progress)
    dtype = torch_dtype(spec.dtype)
    for ref in model_tensors(spec):
        own = beside[(ref.role, ref.layer, ref.branch)]
        w_scale = next((scales[s] for s in own if s.kind is ScaleKind.WEIGHT), None)
        for r, rows in row_chunks(reader, ref):
            chunk = fp8.quantize(rows, w_scale) if is_fp8(spec, ref) else rows.to(dtype)
            bar.update(writer.write_rows(ref.hf_name, r, chunk))
        for s in own:
            bar.update(writer.write(s.name, torch.tensor(scales[s], dtype=torch.float32)))
    bar.close()
    writer.close()
    return writer.total_bytes


def _planned_bytes(spec: ModelSpec) -> int:
    return sum(r.numel() * torch_dtype(stored_dtype(spec, r)).itemsize for r in model_tensors(spec))


@dataclass
class _Job:
    """What `_prepare` checked and what the run needs of it."""

    source: Path
    spec: ModelSpec  # the source's
    qspec: ModelSpec  # the one written
    reader: CheckpointReader
    sidecars: list[str]
    config: dict[str, Any]
    calib_ids: torch.Tensor


def _prepare(source: Path, out: str | Path, calib: str | Path, inputs: list, kv_cache: str | None,
             exclude: tuple[str, ...], heldout: str | Path | None, calib_tokens: int, heldout_tokens: int,
             seq_len: int, tokenizer: str | Path | None, overwrite: bool, follow_symlinks: bool | None) -> _Job:
    """Every check that can refuse the job, before the output exists (and before the long calibration)."""
    check_output(out, inputs=inputs, overwrite=overwrite)
    spec, reader = _check_source(source, follow_symlinks)
    qspec = spec.with_quant(quantization_for(spec, kv_cache, exclude))
    if not fp8_linears(qspec):
        raise ExportError(f"--exclude {' '.join(qspec.quant.exclude)}: excludes every linear of {source}; "
                          f"nothing to quantize")
    sidecars = sidecar_files(source, follow_symlinks=follow_symlinks)
    tok = load_tokenizer(source, tokenizer, kind="tokenizers")
    calib_ids = _text_tokens(calib, "--calib", tok, spec.vocab, calib_tokens, seq_len)
    if heldout is not None:
        if _same_text(heldout, calib):
            raise ExportError(f"--heldout {heldout}: is the calibration text; score on text the scales were not "
                              f"fitted to")
        _text_tokens(heldout, "--heldout", tok, spec.vocab, heldout_tokens, seq_len)
    check_output(out, inputs=inputs, overwrite=overwrite, planned_bytes=_planned_bytes(qspec))
    return _Job(source, spec, qspec, reader, sidecars, read_config_json(source / "config.json"), calib_ids)


# ---- the command ----------------------------------------------------------------------------
def quantize_checkpoint(source: str | Path, out: str | Path, calib: str | Path, *, kv_cache: str | None = None,
                        exclude: tuple[str, ...] = DEFAULT_EXCLUDE, heldout: str | Path | None = None,
                        calib_tokens: int = 2048, heldout_tokens: int = 4096, seq_len: int = 128, batch: int = 8,
                        tokenizer: str | Path | None = None, overwrite: bool = False,
                        max_shard_bytes: int = 5 << 30, progress: bool = True,
                        follow_symlinks: bool | None = None) -> QuantizeResult:
    """Post-training per-tensor FP8 of the HF checkpoint `source`, written to `out` (atomically).

    `calib` (a file or a directory of text) is tokenized with the source's tokenizer and its first
    `calib_tokens` tokens run through the unquantized model; `heldout` (other text) scores the
    result (perplexity, KL(source || FP8), top-1 agreement). `exclude`: ModelOpt `exclude_modules`
    patterns left in the model dtype. Everything is checked before `out` is created.
    """
    t0 = time.perf_counter()
    inputs = [source, calib, heldout, tokenizer]
    job = _prepare(Path(source), out, calib, inputs, kv_cache, exclude, heldout, calib_tokens, heldout_tokens,
                   seq_len, tokenizer, overwrite, follow_symlinks)
    source, spec, qspec, reader, quant = job.source, job.spec, job.qspec, job.reader, job.qspec.quant
    amaxes, t_cal = _calibrate(reader, spec, job.calib_ids, batch, progress,
                               head=any(r.role is Role.LM_HEAD for r in fp8_linears(qspec)))
    scales = fp8_scales(qspec, weight_amaxes(reader, qspec, progress), amaxes)
    with output_dir(out, inputs=inputs, overwrite=overwrite, planned_bytes=_planned_bytes(qspec)) as tmp:
        t1 = time.perf_counter()
        nbytes = write_fp8_tensors(tmp, reader, qspec, scales, max_shard_bytes, progress)
        t_write = time.perf_counter() - t1
        copy_sidecars(source, tmp, names=job.sidecars)
        write_config(tmp, {**job.config, "quantization_config": quant.config_json()})
        write_quant_config(tmp, quant)
        install_remote_code(tmp)  # a DeciLM source without its own auto_map gets ours, as `fuse` does
        written = ModelSpec.load(tmp)
        CheckpointReader(tmp).validate(written)  # what a loader reads back: FP8 weights and every scale
        scores = None
        if heldout is not None:
            scores = evaluate(source, [tmp], heldout, tokens=heldout_tokens, seq_len=seq_len, batch=batch,
                              tokenizer=tokenizer, progress=progress)
            scores[1].name = Path(out).name
        report = _report(source, qspec, scales, amaxes, calib, heldout, scores, reader.total_bytes(), nbytes,
                         {"calibrate": t_cal, "write": t_write, "total": time.perf_counter() - t0})
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    reader.close()
    return QuantizeResult(Path(out), written, scales, scores, report)


def _calibrate(reader: CheckpointReader, spec: ModelSpec, ids: torch.Tensor, batch: int,
               progress: bool, head: bool) -> tuple[Amaxes, float]:
    """The unquantized model in fp32, one layer resident at a time (`runtime.layerwise`: the
    largest layer plus the batches' hidden states, not the whole model), observed over the
    calibration batches; `head`: the lm_head is quantized, so its input is observed too."""
    from export.runtime.layerwise import run_layerwise

    t0 = time.perf_counter()
    amaxes = Amaxes(tokens=ids.numel())
    run_layerwise(HFRankWeights(reader, spec, Mapping(), 0), list(ids.split(batch)), observe=amaxes.record,
                  head=head, progress=progress, label="calibrate")
    return amaxes, time.perf_counter() - t0


def _report(source: Path, spec: ModelSpec, scales: dict[ScaleRef, float], amaxes: Amaxes, calib: str | Path,
            heldout: str | Path | None, scores: list[Score] | None, source_bytes: int, nbytes: int,
            seconds: dict[str, float]) -> dict[str, Any]:
    left = [module_name(r) for r in model_tensors(spec) if r.role in LINEAR_ROLES and not is_fp8(spec, r)]
    kv = any(s.kind in (ScaleKind.K, ScaleKind.V) for s in scales)
    return {
        "source": str(source.resolve()),
        "quantization": spec.quant.hf_quant_config()["quantization"],
        "recipe": {"weight_scale": "amax(|W|) / 448 per tensor",
                   "input_scale": "amax(|x|) / 448 per tensor over the calibration tokens (unquantized model)",
                   "kv_scales": "amax of k (after RoPE) and of v / 448 per attention" if kv else None,
                   "shared": "q/k/v and gate/up of each layer share one weight scale and one input scale "
                             "(ModelOpt preprocess_linear_fusion)"},
        "calibration": {"text": str(calib), "tokens": amaxes.tokens},
        "fp8_linears": len(fp8_linears(spec)), "left_unquantized": left,
        "bytes": {"source": source_bytes, "fp8": nbytes, "ratio": nbytes / source_bytes},
        "heldout": None if heldout is None else {"text": str(heldout), "tokens": scores[0].tokens if scores else 0},
        "scores": None if scores is None else [s.to_json() for s in scores],
        "seconds": seconds,
    }


"""A realistic FP8 checkpoint of the demo model, by a small calibration pass (test helper).

Until `python -m export quantize` (branch fp8-quantize) lands, this is the smallest ModelOpt-style
post-training quantizer the FP8 fusion tests and study need: per-tensor weight scales amax / 448,
input scales from each linear's input amax over calibration text run through the reference runtime
(`Decoder.observe`), KV scales from the k/v amax; `lm_head` excluded, as ModelOpt's FP8 recipe does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from export import fp8
from export.fusion.calib import token_batch
from export.io.output import output_dir
from export.io.reader import CheckpointReader
from export.io.safetensors_format import torch_dtype
from export.io.tokenizer import load_tokenizer
from export.io.writer import HFCheckpointWriter, copy_sidecars, write_config, write_quant_config
from export.mapping import Mapping
from export.quantization import Quantization
from export.runtime.model import load_decoder
from export.sources import open_source
from export.spec import ModelSpec
from export.tensors import ScaleKind, is_fp8, model_tensors, scale_refs, stored_dtype

FP8_DEMO = Quantization("FP8", "FP8", ("lm_head",))


@torch.no_grad()
def calibrate(src: Path, ids: torch.Tensor, batch: int = 8) -> dict[object, float]:
    """amax of every linear's input (key (role, layer[, branch])) and of every layer's k and v
    (key (ScaleKind.K | V, layer key)) over `ids`, on the reference runtime in fp32."""
    source = open_source(src)
    dec = load_decoder(source.rank_weights(Mapping(1, 1), 0), dtype=torch.float32)
    amax: dict[object, float] = {}

    def observe(key: object, x: torch.Tensor) -> None:
        amax[key] = max(amax.get(key, 0.0), float(x.abs().max()))
    dec.observe = observe
    for b in ids.split(batch):
        dec(b)
    return amax


def _scale_value(s, amax: dict, weight_scales: dict) -> float:
    key = (s.role, s.layer) if s.branch is None else (s.role, s.layer, s.branch)
    if s.kind is ScaleKind.WEIGHT:
        return weight_scales[key]
    if s.kind is ScaleKind.INPUT:
        return fp8.scale_for(amax[key])
    layer_key = s.layer if s.branch is None else (s.layer, s.branch)
    return fp8.scale_for(amax[(s.kind, layer_key)])


def write_fp8_demo(src: Path, out: Path, calib_text: Path, *, tokens: int = 2048,
                   quant: Quantization = FP8_DEMO) -> Path:
    """`src` (bf16 HF checkpoint) post-training quantized to a ModelOpt FP8 checkpoint at `out`."""
    spec = ModelSpec.load(src)
    ids = token_batch(calib_text, load_tokenizer(src, None, kind="tokenizers"), spec.vocab, tokens, 128)
    amax = calibrate(src, ids)
    qspec = spec.with_quant(quant)
    reader = CheckpointReader(src)
    refs = model_tensors(qspec)
    plan = [(r.hf_name, torch_dtype(stored_dtype(qspec, r)), r.shape) for r in refs]
    plan += [(s.name, torch.float32, ()) for s in scale_refs(qspec)]
    with output_dir(out) as tmp:
        writer = HFCheckpointWriter(tmp, plan)
        weight_scales = {}
        for r in refs:
            t = reader.read(r)
            if is_fp8(qspec, r):
                key = (r.role, r.layer) if r.branch is None else (r.role, r.layer, r.branch)
                weight_scales[key] = scale = fp8.scale_for(t.float().abs().max())
                t = fp8.quantize(t, scale)
            writer.write(r.hf_name, t)
        for s in scale_refs(qspec):
            writer.write(s.name, torch.tensor(_scale_value(s, amax, weight_scales), dtype=torch.float32))
        writer.close()
        copy_sidecars(src, tmp)
        write_config(tmp, qspec.to_hf_config())
        write_quant_config(tmp, qspec.quant)
    reader.close()
    return Path(out)

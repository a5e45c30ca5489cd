"""`build engines/NAME --onnx`: write engines/NAME/onnx/ (graph + external weights + config.json).

The graph is built at tp = 1 from the engine's checkpoint when that is unsplit, else from the
manifest's source checkpoint (split rank files are never re-merged: that would be a second split
rule). Output is atomic; onnx.checker runs on the written files before they land; the manifest
records the engine only afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from export.engine_dir import ONNX_DIR, EngineDir
from export.errors import ExportError
from export.io.output import check_output, output_dir
from export.io.writer import write_config
from export.layout import rank_pieces
from export.mapping import Mapping
from export.onnx.external import ExternalData
from export.onnx.graph import DATA_FILE, IR_VERSION, MODEL_FILE, OPSET, build_model
from export.progress import byte_progress
from export.quantization import refusal
from export.spec import ModelSpec

GRAPH_DTYPE = "float32"


@dataclass(frozen=True)
class OnnxResult:
    out: Path
    source: Path
    spec: ModelSpec
    nodes: int
    weight_bytes: int
    seconds: float

    def summary(self) -> str:
        kv = self.spec.attention_layers()
        return (f"wrote {self.out}: {MODEL_FILE} (opset {OPSET}, {self.nodes} nodes, {self.spec.num_layers} layers, "
                f"KV inputs for {len(kv)} attention layers {kv}) + {DATA_FILE} "
                f"({self.weight_bytes / 1e6:.1f} MB fp32) in {self.seconds:.2f} s; onnx.checker passed")


def graph_bytes(spec: ModelSpec) -> int:
    """fp32 bytes of all initializers (a tied lm_head is written as its own transposed copy)."""
    return sum(4 * p.numel() for p in rank_pieces(spec, Mapping(1, 1), 0))


def export_onnx(source: str | Path, out: str | Path, *, progress: bool = True, overwrite: bool = False) -> OnnxResult:
    """Checkpoint (HF dir, unsplit TRT-LLM checkpoint or engines/NAME) -> ONNX directory `out`."""
    import onnx

    from export.sources import load_spec, open_source

    t0 = time.perf_counter()
    check_output(out, inputs=[source], overwrite=overwrite)
    quant = load_spec(Path(source)).quant
    if not quant.is_none:  # the graph is fp32 matmuls: an FP8 checkpoint would need Q/DQ nodes we do not write
        raise ExportError(refusal(str(source), "the ONNX export", quant))
    spec, own, make = open_source(Path(source))
    if own is not None and own.world_size != 1:
        raise ExportError(f"{source}: checkpoint is split for tp={own.tp} pp={own.pp}; the ONNX graph is built "
                          f"from tp=1 weights (an HF checkpoint or a --tp 1 conversion)")
    if spec.parallel_layers() and own is None:
        return _export_parallel(Path(source), Path(out), spec, progress=progress, overwrite=overwrite)
    weights = make(Mapping(1, 1), 0)
    total = graph_bytes(spec)
    with output_dir(out, inputs=[source], overwrite=overwrite, planned_bytes=total) as tmp:
        data = ExternalData(tmp, DATA_FILE)
        bar = byte_progress(total, "onnx", enabled=progress)
        try:
            model = build_model(spec, weights, data, bar.update)
        finally:
            data.close()
            bar.close()
        onnx.save(model, str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        write_config(tmp, dataclasses.replace(spec, dtype=GRAPH_DTYPE).to_hf_config())
    return OnnxResult(Path(out), Path(source), spec, len(model.graph.node), total, time.perf_counter() - t0)


def _export_parallel(source: Path, out: Path, spec: ModelSpec, *, progress: bool, overwrite: bool) -> OnnxResult:
    """An attention-free parallel_blocks layer is exported as the one wide FFN it equals (as
    `convert` does: branch norms folded in fp32 via a scratch checkpoint beside `out`, removed
    after); attention branches are refused by layer."""
    import tempfile

    from export.fusion.fuse import widen_parallel_checkpoint

    spec.refuse_unsupported("the ONNX export", plain_mlp=False, ffn_only_parallel_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".widen-", dir=out.parent) as scratch:
        wide = Path(scratch) / "checkpoint"
        widen_parallel_checkpoint(source, wide)
        res = export_onnx(wide, out, progress=progress, overwrite=overwrite)
    return dataclasses.replace(res, source=source)


def build_onnx(engine_dir: str | Path, *, progress: bool = True, overwrite: bool = False) -> OnnxResult:
    """engines/NAME -> engines/NAME/onnx/, recorded as manifest.engines["onnx"]."""
    import onnx

    engine = EngineDir(engine_dir)
    source = engine.tp1_weights()
    res = export_onnx(source, engine.path / ONNX_DIR, progress=progress, overwrite=overwrite)
    m = EngineDir(engine.path).manifest  # re-read: export_onnx ran in between
    m.engines["onnx"] = {
        "path": ONNX_DIR, "model": MODEL_FILE, "data": DATA_FILE, "opset": OPSET, "ir_version": IR_VERSION,
        "dtype": GRAPH_DTYPE, "tp": 1, "built_from": str(source), "onnx": onnx.__version__,
        "kv_layers": res.spec.attention_layers(), "nodes": res.nodes, "weight_bytes": res.weight_bytes}
    m.save(engine.path)
    return res


def gpu_hint(engine_dir: str | Path) -> str:
    """The trtexec command for this engine's graph and build limits (to run on a GPU host)."""
    import shlex

    from export.onnx.tensorrt import profile_shapes, trtexec_command

    engine = EngineDir(engine_dir)
    m, onnx_dir = engine.manifest, engine.onnx
    shapes = profile_shapes(ModelSpec.load(onnx_dir), int(m.build["max_batch_size"]), int(m.build["max_input_len"]),
                            int(m.build["max_seq_len"]))
    cmd = trtexec_command(onnx_dir / MODEL_FILE, shapes, onnx_dir / "model.plan")
    return "on a GPU host with TensorRT (not run here):\n  " + shlex.join(cmd)

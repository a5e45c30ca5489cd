"""TensorRT from the ONNX graph on a GPU host: the optimization profile and the exact commands.

Not run here (no GPU, no TensorRT on the build machine); `build --onnx` prints these so the step
on a GPU host is a copy-paste. One profile covers prefill (seq up to max_input_len, no past) and
decode (seq 1, past up to max_seq_len - 1); batch up to max_batch_size.
"""

from __future__ import annotations

from pathlib import Path

from export.onnx.graph import kv_names
from export.spec import ModelSpec

Dims = tuple[int, ...]


Profile = dict[str, tuple[Dims, Dims, Dims]]


def profile_shapes(spec: ModelSpec, max_batch: int, max_input_len: int, max_seq_len: int) -> Profile:
    """input name -> (min, opt, max) shapes; opt is a mid-length decode step at half the batch."""
    batch_opt = max(1, max_batch // 2)
    shapes: Profile = {
        "input_ids": ((1, 1), (batch_opt, 1), (max_batch, max_input_len)),
        "position_ids": ((1, 1), (batch_opt, 1), (max_batch, max_input_len)),
        "attention_mask": ((1, 1), (batch_opt, max_seq_len // 2 + 1), (max_batch, max_seq_len)),
    }
    for i in spec.attention_layers():
        kv = int(spec.layers[i].attention.kv_heads or 0)
        for name in kv_names(i)[:2]:
            shapes[name] = ((1, kv, 0, spec.head_dim), (batch_opt, kv, max_seq_len // 2, spec.head_dim),
                            (max_batch, kv, max_seq_len - 1, spec.head_dim))
    return shapes


def _flag(shapes: Profile, k: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[k]))}" for name, s in shapes.items())


def trtexec_command(model: Path, shapes: Profile, plan: Path,
                    precision: str = "--fp16") -> list[str]:
    """trtexec building a serialized engine from the graph with one dynamic-shape profile."""
    return ["trtexec", f"--onnx={model}", f"--minShapes={_flag(shapes, 0)}", f"--optShapes={_flag(shapes, 1)}",
            f"--maxShapes={_flag(shapes, 2)}", precision, f"--saveEngine={plan}"]


def ort_tensorrt_options(shapes: Profile, cache_dir: Path) -> dict[str, str | bool]:
    """Provider options for ORT's TensorrtExecutionProvider with the same profile."""
    return {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
            "trt_profile_min_shapes": _flag(shapes, 0), "trt_profile_opt_shapes": _flag(shapes, 1),
            "trt_profile_max_shapes": _flag(shapes, 2)}

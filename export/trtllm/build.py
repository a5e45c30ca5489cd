"""`build`: trtllm-build on GPU hosts; on others, say what is missing and what still works.

TensorRT-LLM removed the TensorRT engine path after 1.3.0rc20, so the `trtllm` extra pins 1.2.1
(the line NVIDIA's tritonserver trtllm containers pair). trtllm-build runs as an argument list,
into a temporary directory that becomes engines/NAME/trtllm only when it succeeded, and only then
is the engine recorded in the manifest.

An FP8 checkpoint (config.json `quantization.quant_algo: FP8`) needs no flag to be built as FP8:
trtllm-build reads the quantization from config.json and swaps every linear not in
`exclude_modules` for `FP8Linear` / `FP8RowLinear`. `FP8_FLAGS` adds what 1.2.1 leaves off for it
(`builder.py`, `commands/build.py`, `plugin/plugin.py`; docs/fp8.md): the FP8 context FMHA,
where an FP8 KV cache makes it usable. Unverified here: no trtllm-build runs on this host.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from export.engine_dir import EngineDir
from export.errors import ExportError
from export.io.output import output_dir

log = logging.getLogger(__name__)

PINNED = "1.2.1"
LAST_WITH_ENGINES = "1.3.0rc20"  # the last release with trtllm-build
BUILD_KEYS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")


# (quant_algo, kv_cache_quant_algo) of config.json -> flags added for it. FP8 weights alone get
# none: `--use_fp8_context_fmha` with a model-dtype KV cache is switched off again by the builder
# once paged context FMHA is on ("FP8 Paged Context FMHA is disabled because it must be used together
# with fp8 KV Cache"). `--gemm_plugin auto` stays (the model dtype: FP8Linear then runs TensorRT's
# own FP8 GEMM from its quantize/dequantize pair; `--gemm_plugin fp8` is the FP8 GEMM plugin, a
# per-workload tuning choice). `--use_fused_mlp` stays at its default (enable): for FP8 the build
# fuses fc and gate into one GEMM requantized to their max scale, as `fuse` does for the FFN.
FP8_FLAGS: dict[tuple[str | None, str | None], tuple[str, ...]] = {
    ("FP8", "FP8"): ("--use_fp8_context_fmha", "enable"),  # Ada/Hopper; the builder disables it below SM 89
    (None, "FP8"): ("--use_fp8_context_fmha", "enable"),
}


def quant_flags(quantization: dict | None) -> list[str]:
    """The flags `FP8_FLAGS` adds for a checkpoint's config.json `quantization`."""
    q = quantization or {}
    return list(FP8_FLAGS.get((q.get("quant_algo"), q.get("kv_cache_quant_algo")), ()))


def trtllm_build_args(checkpoint_dir: Path, output_dir: Path, *, workers: int, max_batch_size: int,
                      max_input_len: int, max_seq_len: int, max_num_tokens: int,
                      quantization: dict | None = None) -> list[str]:
    """The exact trtllm-build command (flags as TRT-LLM's Nemotron-NAS README and CI use them, plus
    the FP8 ones for the checkpoint's `quantization`)."""
    return ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir),
            "--gemm_plugin", "auto", "--kv_cache_type", "paged",
            "--max_batch_size", str(max_batch_size), "--max_input_len", str(max_input_len),
            "--max_seq_len", str(max_seq_len), "--max_num_tokens", str(max_num_tokens),
            "--workers", str(workers), *quant_flags(quantization)]


def checkpoint_quantization(ckpt: Path) -> dict | None:
    """config.json `quantization` of the checkpoint to build (parsed and checked by its reader)."""
    from export.trtllm.config import read_trtllm_config, trtllm_quantization

    spec, mapping = read_trtllm_config(ckpt)
    return trtllm_quantization(spec, mapping)


def has_engine_path(version: str) -> bool:
    """True for TensorRT-LLM releases that still ship trtllm-build (<= 1.3.0rc20)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) <= Version(LAST_WITH_ENGINES)
    except InvalidVersion:
        return True  # a local build: let trtllm-build itself decide


def missing_requirements() -> list[str]:
    """What this host lacks for trtllm-build; empty when a build can run."""
    missing = []
    if importlib.util.find_spec("tensorrt_llm") is None:
        missing.append(f"the tensorrt_llm package (pip install 'ffn-fusion-export[trtllm]', i.e. "
                       f"tensorrt-llm=={PINNED}, on a Linux host with CUDA)")
    else:
        version = metadata.version("tensorrt-llm") if _has_dist("tensorrt-llm") else "unknown"
        if version != "unknown" and not has_engine_path(version):
            missing.append(f"tensorrt-llm {version} has no TensorRT engine path (removed after {LAST_WITH_ENGINES}); "
                           f"install tensorrt-llm=={PINNED}")
        if shutil.which("trtllm-build") is None:
            missing.append("the trtllm-build executable on PATH")
    if _gpu_count() == 0:
        missing.append("an NVIDIA GPU (torch sees no CUDA device)")
    return missing


def _has_dist(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class BuildOutcome:
    built: bool
    message: str


def build(engine_dir: Path, *, options: dict[str, int] | None = None, require: bool = False,
          overwrite: bool = False) -> BuildOutcome:
    """Build engines/NAME/trtllm from the manifest's checkpoint, or explain why not.

    Raises ExportError when the build is impossible and `require` is set, or when trtllm-build fails.
    """
    engine = EngineDir(engine_dir)
    engine_dir, manifest, ckpt = engine.path, engine.manifest, engine.checkpoint
    settings = {**manifest.build, **{k: v for k, v in (options or {}).items() if v is not None}}
    missing = missing_requirements()
    if missing:
        msg = ("TensorRT-LLM engine NOT built. Missing:\n  - " + "\n  - ".join(missing)
               + f"\nStill works: the CPU engine, i.e. the TRT-LLM checkpoint in {ckpt} "
               f"run by the reference runtime (`python -m export verify {engine_dir} --against SOURCE`, "
               f"then `package`/`serve`). On a GPU host with tensorrt-llm=={PINNED}: `python -m export build "
               f"{engine_dir}`.")
        if require:
            raise ExportError(msg)
        return BuildOutcome(False, msg)
    out = engine_dir / "trtllm"
    sizes = {k: int(settings[k]) for k in BUILD_KEYS}
    workers = manifest.mapping.world_size
    quant = checkpoint_quantization(ckpt)
    with output_dir(out, inputs=[ckpt], overwrite=overwrite) as tmp:
        args = trtllm_build_args(ckpt, tmp, workers=workers, quantization=quant, **sizes)
        log.info("running %s", " ".join(args))
        proc = subprocess.run(args, check=False)
        if proc.returncode != 0:
            raise ExportError(f"trtllm-build failed with exit code {proc.returncode}; nothing was recorded")
    manifest.build = sizes
    manifest.engines["trtllm"] = {
        "path": out.name, "tensorrt_llm": metadata.version("tensorrt-llm"),
        "command": trtllm_build_args(ckpt, out, workers=workers, quantization=quant, **sizes)}
    manifest.save(engine_dir)
    return BuildOutcome(True, f"built {out} ({manifest.mapping.world_size} rank engines)")

"""`package`: render a Triton model repository for engines/NAME from `triton_repo/`.

The repository has tensorrtllm_backend's five models (preprocessing -> tensorrt_llm ->
postprocessing wired by `ensemble`, plus `tensorrt_llm_bls`). The engine model comes in two
flavours: `trtllm` (the C++ tensorrtllm backend on engines/NAME/trtllm) and `cpu` (the reference
runtime on engines/NAME/checkpoint, on the python backend). Every value comes from the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.io.output import check_output, output_dir, tree_bytes
from export.io.tokenizer_file import TOKENIZER_JSON, check_tokenizer_json
from export.quantization import Quantization
from export.runtime import registry
from export.sources import load_spec
from export.triton.binary import EXPORT_ROOT
from export.triton.render import fill, parse_model_config, pbtxt_bool
from export.triton.server import DEPLOY_FILE

TEMPLATES = EXPORT_ROOT / "triton_repo"
MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
BACKENDS = ("cpu", "trtllm")
BATCHING = ("inflight_fused_batching", "inflight_batching", "V1")

# What the ensemble wires in addition for the cpu engine, which sends every id generated so far
# so postprocessing can detokenize incrementally, and the request's key so postprocessing can stop
# it when the client cancels (TensorRT-LLM's backend has no such outputs).
ENSEMBLE_EXTRAS = {
    "cpu": ('output_map { key: "generated_ids" value: "_GENERATED_IDS" }\n'
            '      output_map { key: "is_final" value: "_IS_FINAL" }\n'
            '      output_map { key: "request_key" value: "_REQUEST_KEY" }',
            'input_map { key: "GENERATED_IDS" value: "_GENERATED_IDS" }\n'
            '      input_map { key: "IS_FINAL" value: "_IS_FINAL" }\n'
            '      input_map { key: "REQUEST_KEY" value: "_REQUEST_KEY" }'),
    "trtllm": ("", ""),
}
# Source files a flavour leaves out: the C++ tensorrtllm backend has no model.py.
SKIPPED = {("trtllm", "tensorrt_llm"): ("model.py",)}


RUNTIME_DTYPES = registry.ALL_DTYPES


@dataclass(frozen=True)
class RepoSettings:
    """Every value a template needs, typed; `values()` turns them into template strings."""

    backend: str
    tokenizer_dir: Path | None
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    tp: int = 1
    pp: int = 1
    runtime_dtype: str = "float32"               # cpu flavour: compute dtype (weights are upcast at load)
    checkpoint_dir: Path | None = None           # cpu flavour
    runtime: str = "torch"                       # cpu flavour: Engine.start(runtime=), a registry.RUNTIMES name
    engine_dir: Path | None = None               # trtllm flavour
    decoupled: bool = True
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = False
    gpu_device_ids: str | None = None
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 0
    engine_queue_limit: int = 64                 # cpu flavour: requests that may wait for a slot ("busy" beyond)
    kv_cache_tokens: int = 0                     # cpu flavour: KV tokens running requests may reserve (0: default)
    vocab_size: int = 0                          # the model's: postprocessing refuses ids past it (0: the tokenizer's)
    preprocessing_instance_count: int = 1
    postprocessing_instance_count: int = 1
    bls_instance_count: int = 1
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    export_root: Path = field(default=EXPORT_ROOT)

    def check(self) -> None:
        runtime = _runtime(self.runtime)
        rules = [(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}"),
                 (self.runtime_dtype in RUNTIME_DTYPES,
                  f"runtime_dtype must be one of {RUNTIME_DTYPES}, got {self.runtime_dtype!r}"),
                 (self.runtime_dtype in runtime.dtypes or self.backend != "cpu",
                  f"runtime {self.runtime!r} runs {', '.join(runtime.dtypes)} only, got runtime_dtype "
                  f"{self.runtime_dtype!r}"),
                 (self.batching_strategy in BATCHING,
                  f"batching_strategy must be one of {BATCHING}, got {self.batching_strategy!r}"),
                 (0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0,
                  f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {self.kv_cache_free_gpu_mem_fraction}"),
                 (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
                 (self.engine_queue_limit >= 1, f"engine_queue_limit must be >= 1, got {self.engine_queue_limit}"),
                 (self.kv_cache_tokens >= 0, f"kv_cache_tokens must be >= 0, got {self.kv_cache_tokens}"),
                 (0 < self.max_input_len <= self.max_seq_len,
                  f"need 0 < max_input_len ({self.max_input_len}) <= max_seq_len ({self.max_seq_len})")]
        for ok, msg in rules:
            if not ok:
                raise ExportError(f"package: {msg}")

    def values(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for k, v in asdict(self).items():
            out[k] = None if v is None else pbtxt_bool(v) if isinstance(v, bool) else str(v)
        if self.gpu_device_ids is None:  # one GPU per rank, as trtllm-build laid the engine out
            out["gpu_device_ids"] = ",".join(str(i) for i in range(self.tp * self.pp))
        out["engine_extra_outputs"], out["postprocessing_extra_inputs"] = ENSEMBLE_EXTRAS[self.backend]
        return out

    @property
    def world_size(self) -> int:
        return self.tp * self.pp if self.backend == "trtllm" else 1


def settings_from_manifest(engine_dir: Path, backend: str, **overrides: Any) -> RepoSettings:
    """The manifest's facts (TP/PP, dtype, build limits, engine paths) as repository settings."""
    from export.manifest import Manifest

    engine_dir = Path(engine_dir).resolve()
    m = Manifest.load(engine_dir)
    if backend not in m.engines and not (backend == "cpu" and m.checkpoint):
        have = ", ".join(m.engines) or "none"
        hint = " (run `build` on a GPU host)" if backend == "trtllm" else ""
        raise ExportError(f"{engine_dir}: no {backend!r} engine in manifest.json (engines: {have}){hint}")
    entry = dict(m.engines.get(backend, {}))
    build = dict(m.build)
    for key in ("max_batch_size", "max_input_len", "max_seq_len"):
        if build.get(key) is None:
            raise ExportError(f"{engine_dir}/manifest.json: build.{key} is missing")
    tuning = {k: entry[k] for k in ("batching_strategy", "batch_scheduler_policy", "kv_cache_free_gpu_mem_fraction",
                                    "enable_kv_cache_reuse", "gpu_device_ids", "decoupled") if k in entry}
    s = RepoSettings(
        backend=backend, tokenizer_dir=engine_dir / m.tokenizer if m.tokenizer else None,
        max_batch_size=int(build["max_batch_size"]), max_input_len=int(build["max_input_len"]),
        max_seq_len=int(build["max_seq_len"]), tp=m.tp, pp=m.pp, vocab_size=load_spec(engine_dir).vocab,
        checkpoint_dir=engine_dir / entry.get("path", m.checkpoint) if backend == "cpu" else None,
        engine_dir=engine_dir / entry.get("path", "trtllm") if backend == "trtllm" else None,
        **tuning)
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def render_model(name: str, settings: RepoSettings, templates: Path = TEMPLATES) -> str:
    """One model's config.pbtxt, rendered and parsed (RenderError names the file and key)."""
    src = templates / name
    tpl = src / f"config.{settings.backend}.pbtxt"
    if not tpl.is_file():
        tpl = src / "config.pbtxt"
    where = f"{name}/config.pbtxt"
    text = fill(tpl.read_text(), settings.values(), where)
    parse_model_config(text, where, expect_name=name)
    return text


def render_repo(settings: RepoSettings, out: Path, templates: Path = TEMPLATES, *, overwrite: bool = False,
                bundle: bool = False) -> Path:
    """Write the repository atomically: every config rendered and parsed before anything lands.

    The repository may not overlap what it points at (engine, checkpoint, tokenizer) nor the templates.
    With `bundle`, the engine files the python models read (tokenizer, checkpoint, ONNX graph) are
    placed inside the repository under `engine/` and the configs name them relative to it, so the
    repository can be moved or mounted elsewhere."""
    settings.check()
    inputs = [templates, settings.tokenizer_dir, settings.checkpoint_dir, settings.engine_dir]
    check_output(out, inputs=inputs, overwrite=overwrite)
    if not (templates / "ensemble" / "config.pbtxt").is_file():
        raise ExportError(f"model repository sources not found at {templates} (run from a source checkout)")
    if settings.tokenizer_dir is None or not Path(settings.tokenizer_dir).is_dir():
        raise ExportError(f"package: the engine has no tokenizer directory ({settings.tokenizer_dir}); "
                          f"pre/postprocessing need the tokenizer files")
    if (Path(settings.tokenizer_dir) / TOKENIZER_JSON).is_file():  # else it fails only when served
        check_tokenizer_json(Path(settings.tokenizer_dir) / TOKENIZER_JSON)
    trees = bundled_trees(settings) if bundle else {}
    rendered = relocated(settings) if bundle else settings
    configs = {name: render_model(name, rendered, templates) for name in MODELS}
    planned = sum(tree_bytes(templates / name) for name in MODELS) + _copy_bytes(trees, Path(out))
    with output_dir(out, inputs=inputs, overwrite=overwrite, planned_bytes=planned) as tmp:
        for name, text in configs.items():
            skip = SKIPPED.get((settings.backend, name), ())
            shutil.copytree(templates / name, tmp / name,
                            ignore=shutil.ignore_patterns("config*.pbtxt", "__pycache__", *skip))
            (tmp / name / "config.pbtxt").write_text(text)
        for rel, src in trees.items():
            link_tree(src, tmp / rel)
        deploy = {"backend": settings.backend, "world_size": settings.world_size,
                  "settings": {k: v for k, v in settings.values().items() if "extra" not in k}}
        (tmp / DEPLOY_FILE).write_text(json.dumps(deploy, indent=2) + "\n")
    return Path(out)


@dataclass(frozen=True)
class Flavour:
    """One `package --backend` kind: what it writes, and whether `serve` can run it."""

    package: Callable[..., Path]   # (source, out, *, overwrite, **overrides) -> out
    help: str
    triton: bool = True            # a Triton model repository (else files for another server)
    runtime: str | None = None     # the runtime its engine model runs, where the flavour fixes one


def _llmapi(name: str) -> Callable[..., Path]:
    def run(*args: Any, **kwargs: Any) -> Path:
        from export.triton import llmapi

        return getattr(llmapi, name)(*args, **kwargs)
    return run


def _package_engine(engine_dir: str | Path, out: str | Path, *, backend: str = "cpu", overwrite: bool = False,
                    flag: str | None = None, **overrides: Any) -> Path:
    """The ensemble/BLS repository. The cpu flavour's engine model runs `runtime` (a registry name):
    one that runs its own engine beside the checkpoint (onnx: engines/NAME/onnx) needs it there,
    and one that runs in one process only is rendered at tp = pp = 1."""
    flag = flag or backend
    unknown = set(overrides) - {f.name for f in fields(RepoSettings)} | {"tp", "pp"} & set(overrides)
    if backend != "cpu":
        unknown |= {"runtime"} & set(overrides)  # the trtllm engine model is TensorRT-LLM's own
    if unknown:  # tp/pp: the checkpoint's own split
        raise ExportError(f"package --backend {flag}: {', '.join(sorted(unknown))} do not apply to it")
    check_output(out, inputs=[engine_dir, TEMPLATES], overwrite=overwrite)
    quant = engine_quantization(Path(engine_dir))
    runtime = None
    if backend == "cpu":  # the named runtime if it runs this checkpoint (an FP8 one: torch), else the fastest that does
        dtype = overrides.get("runtime_dtype", "float32")
        chosen = overrides.get("runtime") or default_runtime(Path(engine_dir), dtype, quant)
        runtime = _runtime_for(quant, chosen, f"package: {engine_dir}")
        overrides["runtime"] = runtime.name
    if runtime is not None and runtime.engine is not None:
        _require_engine(Path(engine_dir), runtime.engine)
    settings = settings_from_manifest(Path(engine_dir), backend, **overrides)
    if runtime is not None and not runtime.runs(settings.tp, settings.pp):
        settings = replace(settings, tp=1, pp=1)  # it runs the whole model in one process, whatever the split
    if backend == "cpu" and not (settings.checkpoint_dir and settings.checkpoint_dir.is_dir()):
        raise ExportError(f"{engine_dir}: checkpoint directory {settings.checkpoint_dir} is missing (run `convert`)")
    return render_repo(settings, Path(out), overwrite=overwrite, bundle=settings.backend == "cpu")


FLAVOURS: dict[str, Flavour] = {
    "cpu": Flavour(partial(_package_engine, backend="cpu"),
                   "ensemble/BLS repository; the engine model is the reference runtime on the python backend"),
    # `--backend onnx` is the spelling from before `--runtime`: `--backend cpu --runtime onnx`
    "onnx": Flavour(partial(_package_engine, backend="cpu", flag="onnx"),
                    "the cpu repository, its engine model running engines/NAME/onnx with ONNX Runtime "
                    "(= cpu --runtime onnx)", runtime="onnx"),
    "trtllm": Flavour(partial(_package_engine, backend="trtllm"),
                      "ensemble/BLS repository on the tensorrtllm backend (engines/NAME/trtllm, GPU host)"),
    "llmapi": Flavour(_llmapi("package_llmapi"),
                      "TensorRT-LLM's Triton LLM-API layout (one model, model.yaml on the HF checkpoint); "
                      "served here by the cpu implementation, on a GPU host by upstream's model.py"),
    "trtllm-serve": Flavour(_llmapi("package_serve_config"),
                            "trtllm-serve command line + --extra_llm_api_options YAML (GPU host; not run here)",
                            triton=False),
}


def package_repo(engine_dir: str | Path, out: str | Path, *, backend: str = "cpu", overwrite: bool = False,
                 **overrides: Any) -> Path:
    """engines/NAME -> what `backend` (a FLAVOURS key) writes at `out` (new, or a previous one replaced
    with `overwrite`); overrides left None keep the manifest's values."""
    flavour = FLAVOURS.get(backend)
    if flavour is None:
        raise ExportError(f"package: backend must be one of {', '.join(FLAVOURS)}, got {backend!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if flavour.runtime is not None:
        overrides["runtime"] = served_runtime(backend, overrides.get("runtime"))
    return flavour.package(engine_dir, out, overwrite=overwrite, **overrides)


def served_runtime(backend: str, runtime: str | None = None, engine_dir: Path | None = None) -> str:
    """The runtime the engine model of `package ENGINE_DIR --backend BACKEND [--runtime RUNTIME]` runs
    (with no runtime named: the flavour's, else `default_runtime` for ENGINE_DIR, else torch)."""
    fixed = FLAVOURS[backend].runtime if backend in FLAVOURS else None
    if fixed is not None and runtime not in (None, fixed):
        raise ExportError(f"package --backend {backend} runs runtime {fixed!r}; got runtime {runtime!r} "
                          f"(use --backend cpu --runtime {runtime})")
    if fixed or runtime:
        return fixed or runtime  # type: ignore[return-value]
    if engine_dir is None or backend != "cpu":
        return "torch"
    return default_runtime(Path(engine_dir), "float32", engine_quantization(Path(engine_dir)))


BUNDLE = Path("tensorrt_llm", "engine")  # in the engine model's directory (a repository subdir would be a model)


def bundled_trees(settings: RepoSettings) -> dict[Path, Path]:
    """Repository-relative destination -> the engine file or directory it comes from."""
    trees = {BUNDLE / "tokenizer": Path(settings.tokenizer_dir)}  # type: ignore[arg-type]
    if settings.checkpoint_dir is not None:
        engine = Path(settings.checkpoint_dir).parent
        trees[BUNDLE / "checkpoint"] = Path(settings.checkpoint_dir)
        trees[BUNDLE / "manifest.json"] = engine / "manifest.json"
        own = _runtime(settings.runtime).engine
        if own is not None:  # the runtime finds its own engine beside checkpoint/ (engines/NAME/onnx)
            trees[BUNDLE / own.name] = engine / own.name
    return trees


def relocated(settings: RepoSettings) -> RepoSettings:
    """The settings the configs are rendered with: the bundled paths, relative to the repository
    (`export.triton.stub.resolve_paths` makes them absolute where the repository is loaded)."""
    return replace(settings, tokenizer_dir=BUNDLE / "tokenizer",
                   checkpoint_dir=BUNDLE / "checkpoint" if settings.checkpoint_dir is not None else None)


def link_tree(src: Path, dst: Path) -> None:
    """Hard links where `src` and `dst` share a filesystem (no bytes copied; the repository keeps
    the files it was packaged with even when engines/NAME is later replaced), else copies."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed there
            shutil.copy2(src, dst)
        return
    dst.mkdir()
    for child in sorted(src.iterdir()):
        if child.is_symlink():
            raise ExportError(f"{child}: a symlink inside the engine directory; package copies plain files only")
        link_tree(child, dst / child.name)


def _copy_bytes(trees: dict[Path, Path], out: Path) -> int:
    """What bundling copies rather than links: everything, when the engine is on another filesystem."""
    parent = next((p for p in [out.absolute(), *out.absolute().parents] if p.exists()), Path("/"))
    return sum(tree_bytes(src) if src.is_dir() else src.stat().st_size
               for src in trees.values() if src.stat().st_dev != parent.stat().st_dev)


def engine_quantization(engine_dir: Path) -> Quantization:
    """The engine's quantization, from its checkpoint's own description (the source registry reads
    each format's); a manifest that records a different one is stale and refused."""
    from export.engine_dir import EngineDir
    from export.manifest import MANIFEST

    quant = load_spec(engine_dir).quant
    engine = EngineDir.of(engine_dir)
    recorded = engine.quantization if engine is not None else quant
    if engine is not None and engine.manifest.quantization is not None and recorded != quant:
        raise ExportError(f"{engine_dir}/{MANIFEST}: quantization says {recorded.describe()} but the checkpoint "
                          f"{engine.checkpoint} is {quant.describe()}: convert again")
    return quant


def _runtime_for(quant: Quantization, chosen: str | None, where: str) -> registry.RuntimeEntry:
    if chosen is not None:
        _runtime(chosen)  # an unknown name: the list of runtimes
    return registry.for_quant(quant, chosen, where)


def _runtime(name: str) -> registry.RuntimeEntry:
    try:
        return registry.get(name)
    except ExportError as e:
        raise ExportError(f"package: {e}") from None


def default_runtime(engine_dir: Path, dtype: str, quant: Quantization | None = None) -> str:
    """What the cpu engine model runs when `--runtime` is not given: the fastest exact runtime that
    runs this engine's split, dtype and quantization and whose own engine is built (`registry.preferred`)."""
    from export.manifest import Manifest

    m = Manifest.load(engine_dir)

    def built(own: registry.OwnEngine) -> bool:
        try:
            _require_engine(engine_dir, own)
        except ExportError:
            return False
        return True
    return registry.preferred(m.tp, m.pp, dtype, built, quant)


def _require_engine(engine_dir: Path, own: registry.OwnEngine) -> None:
    """A runtime's own engine is recorded in the manifest and its model file is there."""
    from export.manifest import Manifest

    m = Manifest.load(engine_dir)
    if own.name not in m.engines or not (m.path_of(engine_dir, own.name) / m.engines[own.name]["model"]).is_file():
        raise ExportError(f"{engine_dir}: no {own.label} engine (manifest engines: {', '.join(m.engines) or 'none'}); "
                          f"create it with `python -m export build {engine_dir} {own.build}`")

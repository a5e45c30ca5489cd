"""TensorRT-LLM's PyTorch-flow routes for the fused HF checkpoint: the Triton LLM-API model and trtllm-serve.

`package --backend llmapi` writes a repository in the layout of TensorRT-LLM's
`triton_backend/all_models/llmapi/`: one python model `tensorrt_llm` whose `1/model.yaml` holds the
`LLM()` arguments (`model`, `backend: pytorch`, `tensor_parallel_size`, ..., `kv_cache_config`) and a
`triton_config`. Its inputs and outputs are upstream's config.pbtxt's (`text_input`, `streaming`,
`sampling_param_*`, ... -> `text_output`, `finish_reason`, ...). Here its `1/model.py` is the cpu
implementation of that interface (our Engine, in-flight batching, TP); on a GPU host upstream's
`1/model.py` + `1/helpers.py` replace it and read the same model.yaml.

`package --backend trtllm-serve` writes the `trtllm-serve` command line and its
`--extra_llm_api_options` YAML with the same sizing (not run here: no TensorRT-LLM on this host).

Everything below that runs per request is plain numpy (tested without a server).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.engine_dir import EngineDir, hf_checkpoint
from export.errors import ExportError
from export.triton.pipeline import Arrays, EngineRequest, default_ids
from export.triton.requests import (
    Limits,
    RequestError,
    check_text_bytes,
    decode_text,
    request_params,
    scalar,
)

# Sources read (NVIDIA/TensorRT-LLM): triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt @0a71057,
# 1/model.yaml @0ebb153, 1/model.py @044a90d, 1/helpers.py @0df60f9; tensorrt_llm/commands/serve.py @00209af.
MODEL = "tensorrt_llm"
YAML_FILE = "model.yaml"
TEMPLATE_DIR = Path("llmapi")  # under triton_repo/: the llmapi layout's models (only `tensorrt_llm`)
SERVE_YAML = "extra_llm_api_options.yaml"
SERVE_SCRIPT = "trtllm-serve.sh"
# helpers.get_sampling_params_from_request: sampling_param_<arg> -> SamplingParams(<arg>=)
SAMPLING = ("best_of", "temperature", "top_k", "top_p", "frequency_penalty", "presence_penalty", "max_tokens",
            "seed", "exclude_input_from_output", "return_perf_metrics")
OUTPUT_CONFIG = ("return_finish_reason", "return_stop_reason", "return_cumulative_logprob")
INPUTS = ("text_input", "image_url", "streaming", *(f"sampling_param_{a}" for a in SAMPLING), "sampling_param_stop",
          *OUTPUT_CONFIG, "stop", "lora_id", "lora_name", "lora_path", "lora_ckpt_source")
# setting -> the input that sets it, for errors
LLMAPI_NAMES = {a: f"sampling_param_{a}" for a in ("max_tokens", "temperature", "top_k", "top_p", "seed")} | {
    "stop_sequences": "sampling_param_stop"}
DEFAULT_MAX_TOKENS = 32  # tensorrt_llm.SamplingParams.max_tokens' default, what upstream gets without the input


@dataclass(frozen=True)
class LlmApiSettings:
    """The `LLM()` arguments both routes write (model.yaml / extra_llm_api_options.yaml)."""

    model: Path                            # the fused HF checkpoint (the PyTorch flow loads HF directly)
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    tp: int = 1
    pp: int = 1
    free_gpu_memory_fraction: float = 0.9  # KvCacheConfig.free_gpu_memory_fraction (trtllm-serve's default)
    trust_remote_code: bool = True         # DeciLM's config class is the checkpoint's own code
    decoupled: bool = True                 # triton_config.decoupled: streaming needs it
    host: str = "0.0.0.0"                  # trtllm-serve only
    port: int = 8000                       # trtllm-serve only

    def check(self) -> None:
        rules = [(self.tp >= 1 and self.pp >= 1, f"tp and pp must be >= 1, got {self.tp}, {self.pp}"),
                 (0.0 < self.free_gpu_memory_fraction <= 1.0,
                  f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}"),
                 (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
                 (self.max_num_tokens >= 1, f"max_num_tokens must be >= 1, got {self.max_num_tokens}"),
                 (self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}"),
                 ((Path(self.model) / "config.json").is_file(), f"{self.model}: not an HF checkpoint (no config.json)")]
        for ok, msg in rules:
            if not ok:
                raise ExportError(f"package: {msg}")

    def llm_args(self) -> dict[str, Any]:
        """`LLM(**...)` keyword arguments, as trtllm-serve's get_llm_args names them."""
        return {"model": str(self.model), "backend": "pytorch",
                "tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp,
                "max_batch_size": self.max_batch_size, "max_num_tokens": self.max_num_tokens,
                "max_seq_len": self.max_seq_len, "trust_remote_code": self.trust_remote_code,
                "kv_cache_config": {"free_gpu_memory_fraction": self.free_gpu_memory_fraction}}

    def model_yaml(self) -> dict[str, Any]:
        # max_batch_size 0: upstream's model takes one prompt per request (Triton-level batching off)
        return {**self.llm_args(), "triton_config": {"max_batch_size": 0, "decoupled": self.decoupled}}

    def extra_llm_api_options(self) -> dict[str, Any]:
        """The YAML trtllm-serve merges over its flags (update_llm_args_with_extra_dict): the sizing."""
        args = self.llm_args()
        return {k: args[k] for k in ("max_batch_size", "max_num_tokens", "max_seq_len", "kv_cache_config")}

    def serve_command(self, yaml_path: str = SERVE_YAML) -> list[str]:
        cmd = ["trtllm-serve", str(self.model), "--backend", "pytorch", "--tp_size", str(self.tp),
               "--pp_size", str(self.pp), "--host", self.host, "--port", str(self.port)]
        if self.trust_remote_code:
            cmd.append("--trust_remote_code")
        return [*cmd, "--extra_llm_api_options", yaml_path]

    def triton_launch(self, repo: str) -> str:
        """How the repository runs on a GPU host with upstream's model.py (its CI's two forms)."""
        world = self.tp * self.pp
        script = "python3 triton_backend/scripts/launch_triton_server.py"
        if world == 1:
            return f"{script} --world_size=1 --model_repo={repo} --no-mpi"
        return f"{script} --world_size={world} --model_repo={repo} --trtllm_llmapi_launch --oversubscribe"


def settings_for(source: Path, **overrides: Any) -> LlmApiSettings:
    """The sizing of an engines/NAME directory (its manifest's build limits and TP/PP; the model is
    its HF source) or of an HF checkpoint (the model's context, trtllm-build's default sizes)."""
    source = Path(source).resolve()
    if EngineDir.holds_manifest(source):
        m = EngineDir(source).manifest
        model, build, tp, pp = hf_checkpoint(source).resolve(), dict(m.build), m.tp, m.pp
    elif (source / "config.json").is_file():
        from export.sources import load_spec
        from export.trtllm.convert import default_build

        model, build, tp, pp = source, default_build(load_spec(source)), 1, 1
    else:
        raise ExportError(f"{source}: neither an engines/NAME directory (manifest.json) nor an HF checkpoint "
                          f"(config.json)")
    from export.manifest import DEFAULT_BUILD

    s = LlmApiSettings(model=model, max_batch_size=int(build["max_batch_size"]),
                       max_num_tokens=int(build.get("max_num_tokens") or DEFAULT_BUILD["max_num_tokens"]),
                       max_seq_len=int(build["max_seq_len"]), tp=tp, pp=pp)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "kv_cache_free_gpu_mem_fraction" in overrides:  # the ensemble flavours' name for it (--kv-cache-fraction)
        overrides["free_gpu_memory_fraction"] = overrides.pop("kv_cache_free_gpu_mem_fraction")
    unknown = set(overrides) - {f.name for f in fields(LlmApiSettings)}
    if unknown:
        raise ExportError(f"package: {', '.join(sorted(unknown))} do not apply to the LLM-API routes")
    s = replace(s, **overrides)
    s.check()
    return s


def dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def package_llmapi(source: str | Path, out: str | Path, *, overwrite: bool = False, **overrides: Any) -> Path:
    """engines/NAME (or an HF checkpoint) -> a repository in upstream's llmapi layout at `out`.

    model.yaml names the HF checkpoint by its absolute path (upstream's LLM() resolves a relative
    one against its own working directory), so the repository is not relocatable apart from it."""
    import shutil

    from export.io.output import check_output, output_dir
    from export.triton.package import TEMPLATES
    from export.triton.render import fill, parse_model_config
    from export.triton.server import DEPLOY_FILE

    s = settings_for(Path(source), **overrides)
    check_output(out, inputs=[source, s.model, TEMPLATES], overwrite=overwrite)
    src = TEMPLATES / TEMPLATE_DIR / MODEL
    where = f"{MODEL}/config.pbtxt"
    values = {"decoupled": "true" if s.decoupled else "false", "export_root": str(TEMPLATES.parent)}
    config = fill((src / "config.pbtxt").read_text(), values, where)
    parse_model_config(config, where, expect_name=MODEL)
    with output_dir(out, inputs=[source, s.model, TEMPLATES], overwrite=overwrite) as tmp:
        shutil.copytree(src, tmp / MODEL, ignore=shutil.ignore_patterns("config*.pbtxt", "__pycache__"))
        (tmp / MODEL / "config.pbtxt").write_text(config)
        (tmp / MODEL / "1" / YAML_FILE).write_text(dump_yaml(s.model_yaml()))
        # the cpu model runs every rank itself (one tritonserver); a GPU host launches world_size ranks
        deploy = {"backend": "llmapi", "world_size": 1, "model": MODEL, "llm_args": s.llm_args(),
                  "gpu_launch": s.triton_launch(str(Path(out).absolute()))}
        (tmp / DEPLOY_FILE).write_text(json.dumps(deploy, indent=2) + "\n")
    return Path(out)


def package_serve_config(source: str | Path, out: str | Path, *, overwrite: bool = False,
                         **overrides: Any) -> Path:
    """engines/NAME (or an HF checkpoint) -> `out`/trtllm-serve.sh + extra_llm_api_options.yaml."""
    from export.io.output import check_output, output_dir

    s = settings_for(Path(source), **overrides)
    check_output(out, inputs=[source, s.model], overwrite=overwrite)
    here = '"$(dirname "$0")"/' + SERVE_YAML
    cmd = " ".join(shlex.quote(a) for a in s.serve_command()[:-2]) + f" --extra_llm_api_options {here}"
    script = ("#!/bin/sh\n# OpenAI-compatible server on the fused HF checkpoint (TensorRT-LLM's PyTorch flow).\n"
              "# Written by `python -m export package --backend trtllm-serve`; not run on the exporting host.\n"
              f'exec {cmd} "$@"\n')
    with output_dir(out, inputs=[source, s.model], overwrite=overwrite) as tmp:
        (tmp / SERVE_YAML).write_text(dump_yaml(s.extra_llm_api_options()))
        (tmp / SERVE_SCRIPT).write_text(script)
        (tmp / SERVE_SCRIPT).chmod(0o755)
    return Path(out)


# ---- the cpu implementation of the llmapi model, per request ---------------------------------------------
@dataclass(frozen=True)
class OutputConfig:
    """helpers.get_output_config_from_request: which optional outputs a response carries."""

    finish_reason: bool = False
    stop_reason: bool = False
    cumulative_logprob: bool = False


def llmapi_request(inputs: Arrays, tokenizer: Any, max_seq_len: int,
                   add_special_tokens: bool = True) -> tuple[EngineRequest, OutputConfig, list[str]]:
    """The llmapi model's inputs of one request -> what our engine runs, the output config, the stop strings.
    RequestError names the input at fault."""
    text = inputs.get("text_input")
    if text is None:
        raise RequestError("text_input is missing from the request")
    text = np.asarray(text, dtype=object)
    if text.ndim > 1 or text.size != 1:  # upstream: "only supports text_input being a 1D tensor", [0] read
        raise RequestError(f"text_input: one prompt per request (a 1-D tensor of 1), got shape {list(text.shape)}")
    check_text_bytes(text.reshape(1, 1), "text_input", max_seq_len * 16)
    prompt = decode_text(text.reshape(-1)[0])
    if not prompt:
        raise RequestError("text_input: empty prompt")
    for name in ("image_url", "lora_id", "lora_name", "lora_path"):
        if inputs.get(name) is not None:
            raise RequestError(f"{name}: not supported by the cpu engine")
    get = {a: scalar(inputs.get(f"sampling_param_{a}"), f"sampling_param_{a}") for a in SAMPLING}
    if get["best_of"] not in (None, 1):
        raise RequestError(f"sampling_param_best_of: the cpu engine returns one sequence (got {get['best_of']})")
    for a in ("frequency_penalty", "presence_penalty"):
        if get[a] not in (None, 0.0):
            raise RequestError(f"sampling_param_{a}: not supported by the cpu engine")
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    raw = inputs.get("sampling_param_stop")
    stops = [] if raw is None else [decode_text(s, "sampling_param_stop")
                                    for s in np.asarray(raw, dtype=object).reshape(-1)]
    stop_ids = [tokenizer.encode(s, add_special_tokens=False) for s in stops if s]
    end_id, _ = default_ids(tokenizer)
    params = request_params(LLMAPI_NAMES, len(ids), Limits(max_seq_len - 1, max_seq_len),
                            max_tokens=DEFAULT_MAX_TOKENS if get["max_tokens"] is None else get["max_tokens"],
                            temperature=get["temperature"], top_k=get["top_k"] or None, top_p=get["top_p"],
                            seed=get["seed"], stop_token_ids=(end_id,) if end_id >= 0 else (),
                            stop_sequences=[w for w in stop_ids if w])
    streaming = bool(scalar(inputs.get("streaming"), "streaming", False))
    cfg = OutputConfig(*(bool(scalar(inputs.get(k), k, False)) for k in OUTPUT_CONFIG))
    if cfg.cumulative_logprob:
        raise RequestError("return_cumulative_logprob: not supported by the cpu engine (no log probabilities)")
    req = EngineRequest.of(ids, params, end_id, stop_ids, streaming)
    return req, cfg, [s for s in stops if s]


def finish_reason(generated: list[int], req: EngineRequest, cancelled: bool = False) -> str:
    """CompletionOutput.finish_reason: 'length' at max_tokens, 'stop' at the end token or a stop sequence."""
    if cancelled:
        return "cancelled"
    return "length" if len(generated) >= req.max_tokens else "stop"


def stop_reason(generated: list[int], req: EngineRequest, stops: list[str]) -> str | None:
    """CompletionOutput.stop_reason: the stop string the output ended on (None for the end token or length)."""
    for ids, s in zip(req.stop_words, stops, strict=False):
        if ids and generated[-len(ids):] == ids:
            return s
    return None


def llmapi_outputs(text: str, cfg: OutputConfig, reason: str | None, stop: str | None) -> dict[str, np.ndarray]:
    """One response, as upstream's _create_response builds it: `text_output` is the text generated so
    far (CompletionOutput.text is cumulative, also when streaming); the optional outputs are str() of
    the value ('None' while unfinished)."""
    out = {"text_output": np.array([text.encode("utf-8")], dtype=object)}
    if cfg.finish_reason:
        out["finish_reason"] = np.array([str(reason).encode()], dtype=object)
    if cfg.stop_reason:
        out["stop_reason"] = np.array([str(stop).encode()], dtype=object)
    return out

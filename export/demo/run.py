"""`python -m export demo`: the whole pipeline on the shipped Puzzle-style model, step by step.

analyze -> fuse -> evaluate -> convert (tp 2) -> verify -> build (TensorRT-LLM where present; ONNX) -> package
-> serve -> query (streaming) -> stop. With `--fp8`: analyze -> quantize (calibrated FP8 weights,
activations and KV cache) -> fuse (the FP8 checkpoint) -> evaluate (vs the bf16 source) -> convert
(a TRT-LLM FP8 checkpoint) -> verify -> build -> package (the PyTorch runtime, which emulates FP8)
-> serve -> query.
Each step calls the same library function its subcommand calls and prints what it produced and how
long it took, so a person can rerun any step by hand from the printed paths. The demo replaces its own
previous outputs (as `--overwrite` does), so it can be run again; anything else at those paths is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.demo.paths import DEMO_PUZZLE

PROMPT = "def "


@dataclass
class DemoConfig:
    source: Path = DEMO_PUZZLE
    work: Path = Path("out/demo")
    engine_dir: Path = Path("engines/demo")
    tp: int = 2
    prompt: str = PROMPT
    max_tokens: int = 48
    calib_tokens: int = 2048
    eval_tokens: int = 2048
    # What Triton serves: "onnx" (the ONNX graph is built and `package` serves the fastest exact
    # runtime, onnx-fast: ORT's fused graph at tp=1, see README) or "cpu" (the PyTorch reference
    # runtime over the checkpoint's tp worker processes).
    backend: str = "onnx"
    progress: bool = False
    fp8: bool = False  # quantize to FP8 (weights, activations, KV cache) before fusing; served by "cpu"


@dataclass
class DemoReport:
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@contextmanager
def step(report: DemoReport, name: str, what: str) -> Iterator[dict[str, Any]]:
    """Print the step's header, run it, print its result lines and wall time."""
    print(f"\n== {name}: {what}", flush=True)
    lines: dict[str, Any] = {}
    t0 = time.perf_counter()
    yield lines
    report.timings[name] = time.perf_counter() - t0
    for key, value in lines.items():
        print(f"   {key:<22} {value}")
    print(f"   {'time':<22} {report.timings[name]:.1f} s", flush=True)


def run_demo(cfg: DemoConfig, out: Callable[[str], None] | None = None) -> DemoReport:
    """Every stage on the demo model; raises ExportError at the first failing step."""
    from export.demo.study import write_demo_texts
    from export.fusion.analyze import analyze_checkpoint
    from export.fusion.evaluate import evaluate
    from export.fusion.fuse import fuse_checkpoint
    from export.spec import ModelSpec

    rep = DemoReport()
    cfg.work.mkdir(parents=True, exist_ok=True)
    calib, heldout = write_demo_texts(cfg.work)
    source = ModelSpec.load(cfg.source)
    with step(rep, "analyze", f"block dependency matrix of {cfg.source.name} on {cfg.calib_tokens} tokens") as r:
        analysis = analyze_checkpoint(cfg.source, calib, cfg.work / "analysis", tokens=cfg.calib_tokens,
                                      progress=cfg.progress, overwrite=True)
        groups = [list(g) for g in analysis.plan.groups]
        r["attention-free layers"] = [i for i, lay in enumerate(source.layers) if not lay.has_attention]
        r["proposed groups"] = groups
        r["heatmap"] = cfg.work / "analysis" / "heatmap.png"
    fuse_source = _quantize(cfg, calib, heldout, rep) if cfg.fp8 else cfg.source
    what = "the FP8 checkpoint's" if cfg.fp8 else "each"
    with step(rep, "fuse", f"Ultra-style checkpoint: {what} group becomes one wide FFN (norms folded)") as r:
        fused = fuse_checkpoint(fuse_source, analysis.plan, cfg.work / "fused", progress=cfg.progress, overwrite=True)
        spec = fused.after
        r["blocks"] = f"{source.num_layers} -> {spec.num_layers}"
        r["sync points / token"] = f"{source.sync_points_per_token()} -> {spec.sync_points_per_token()}"
        for g in fused.groups:
            r[f"group {g.label}"] = f"widths {list(g.widths)} -> one FFN of width {g.fused_width}"
        r["checkpoint"] = fused.out
    vs = "fused FP8 vs the unfused bf16 source" if cfg.fp8 else "fused vs unfused"
    with step(rep, "evaluate", f"{vs} on {cfg.eval_tokens} held-out tokens") as r:
        base, cand = evaluate(cfg.source, [fused.out], heldout, tokens=cfg.eval_tokens, progress=cfg.progress)
        r["perplexity"] = f"{base.perplexity:.2f} -> {cand.perplexity:.2f}"
        r["KL vs unfused"] = f"{cand.kl_vs_base:.2e}"
        r["top-1 agreement"] = f"{cand.top1_agreement:.1%}"
        rep.facts["kl"] = cand.kl_vs_base
    _deploy(cfg, fused.out, rep)
    return rep


def _quantize(cfg: DemoConfig, calib: Path, heldout: Path, rep: DemoReport) -> Path:
    """The source quantized to FP8 (per-tensor, calibrated; FP8 KV cache), scored against it."""
    from export.quantize.checkpoint import quantize_checkpoint

    with step(rep, "quantize", f"FP8 weights, activations and KV cache, calibrated on {cfg.calib_tokens} tokens") as r:
        res = quantize_checkpoint(cfg.source, cfg.work / "fp8", calib, kv_cache="fp8", heldout=heldout,
                                  calib_tokens=cfg.calib_tokens, heldout_tokens=cfg.eval_tokens,
                                  progress=cfg.progress, overwrite=True)
        assert res.scores is not None
        base, q = res.scores
        r["quantization"] = res.spec.quant.describe()
        r["perplexity"] = f"{base.perplexity:.2f} -> {q.perplexity:.2f}"
        r["KL vs bf16"] = f"{q.kl_vs_base:.2e}"
        r["top-1 agreement"] = f"{q.top1_agreement:.1%}"
        r["checkpoint"] = res.out
        rep.facts["fp8_kl"] = q.kl_vs_base
    return res.out


def _deploy(cfg: DemoConfig, fused: Path, rep: DemoReport) -> None:
    from export.checks.verify import verify
    from export.onnx.export import build_onnx
    from export.triton.package import package_repo
    from export.trtllm.build import build
    from export.trtllm.convert import convert

    with step(rep, "convert", f"TensorRT-LLM checkpoint at tp={cfg.tp} (one streaming pass)") as r:
        conv = convert(fused, cfg.engine_dir, tp=cfg.tp, progress=cfg.progress, overwrite=True)
        r["rank files"] = sorted(p.name for p in (conv.out / "checkpoint").glob("rank*.safetensors"))
        r["bytes read / written"] = f"{conv.bytes_read:,} / {conv.bytes_written:,}"
        r["engine dir"] = conv.out
    with step(rep, "verify", f"reference runtime on the rank files ({cfg.tp} processes) vs the source at tp=1") as r:
        ver = verify(cfg.engine_dir, fused)
        r["max |logit diff|"] = f"{ver.max_abs_diff:.2e} (tolerance {ver.tolerance:.0e})"
        r["result"] = "PASSED" if ver.passed else "FAILED"
        if not ver.passed:
            from export.errors import ExportError
            raise ExportError(f"verify failed: max abs diff {ver.max_abs_diff:.3e} > {ver.tolerance:.0e}")
    with step(rep, "build", "trtllm-build (GPU hosts with tensorrt-llm), and the ONNX decoder graph") as r:
        outcome = build(cfg.engine_dir)
        r["TensorRT-LLM engine"] = "built" if outcome.built else "NOT built here (unverified; see message)"
        if not outcome.built:
            print("   " + outcome.message.replace("\n", "\n   "))
        if cfg.backend == "onnx":
            graph = build_onnx(cfg.engine_dir, progress=cfg.progress)
            r["ONNX graph"] = f"{graph.out} ({graph.nodes} nodes, checked)"
    runtime = {"onnx": "onnx-fast", "cpu": "torch"}[cfg.backend]
    flavour = {"onnx": "ONNX Runtime's fused graph (onnx-fast) at tp=1", "cpu": f"PyTorch runtime at tp={cfg.tp}"}
    with step(rep, "package", f"Triton model repository, {flavour[cfg.backend]}") as r:
        repo = package_repo(cfg.engine_dir, cfg.work / "triton_repo", backend="cpu", runtime=runtime, overwrite=True)
        r["repository"] = repo
        r["models"] = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    _serve_and_query(cfg, repo, rep)


def _serve_and_query(cfg: DemoConfig, repo: Path, rep: DemoReport) -> None:
    from export.triton.client import Request, query
    from export.triton.server import start_server

    with step(rep, "serve", "real tritonserver on loopback, waiting until every model is ready") as r:
        server = start_server(repo)
        r["http"], r["grpc"] = server.http_url, server.grpc_url
    try:
        with step(rep, "query", f"tritonclient gRPC streaming: {cfg.prompt!r}") as r:
            print("   " + cfg.prompt, end="", flush=True)
            res = query(Request(cfg.prompt, max_tokens=cfg.max_tokens, stream=True), url=server.grpc_url,
                        protocol="grpc", on_text=lambda s: print(s.replace("\n", "\n   "), end="", flush=True))
            print()
            r["result"] = res.summary()
            rep.facts["text"] = res.text
        with step(rep, "query (http)", "HTTP /generate, one response, same prompt") as r:
            res_http = query(Request(cfg.prompt, max_tokens=cfg.max_tokens, stream=False), url=server.http_url,
                             protocol="http")
            r["same text as stream"] = res_http.text == res.text
    finally:
        with step(rep, "stop", "server shut down, no process left") as r:
            r["exit code"] = server.stop()
            r["processes left"] = _group_alive(server.process.pid)


def _group_alive(pgid: int) -> int:
    """1 if any process of the server's process group survived, else 0."""
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return 0
    return 1


def main_demo(cfg: DemoConfig) -> int:
    t0 = time.perf_counter()
    rep = run_demo(cfg)
    total = time.perf_counter() - t0
    print("\n== summary")
    for name, secs in rep.timings.items():
        print(f"   {name:<14} {secs:6.1f} s")
    print(f"   {'total':<14} {total:6.1f} s")
    sys.stdout.flush()
    return 0

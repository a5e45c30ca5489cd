"""package / serve / query: the Triton deployment stage."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from export.commands.registry import comma_ints, command, default_path, prompt_args, with_args
from export.runtime import registry


def _package_args(p: argparse.ArgumentParser) -> None:
    from export.triton.package import FLAVOURS, RUNTIME_DTYPES

    p.add_argument("engine_dir", help="engines/NAME (manifest.json, checkpoint/, tokenizer/); for llmapi and "
                                      "trtllm-serve also an HF checkpoint directory")
    p.add_argument("--out", required=True, help="model repository to write (new, or ours with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous output of this toolkit (anything else is refused)")
    p.add_argument("--json", action="store_true", help="print the repository and its request limits as JSON")
    p.add_argument("--backend", choices=tuple(FLAVOURS), default="cpu",
                   help="; ".join(f"{k} = {f.help}" for k, f in FLAVOURS.items()))
    p.add_argument("--runtime", choices=registry.names(), default=None,
                   help=f"cpu: what the engine model runs (default: the fastest exact one this engine has, "
                        f"registry.PREFERRED: onnx-fast where the ONNX graph is built at tp=1 fp32, else torch) "
                        f"-- {registry.describe()}")
    p.add_argument("--max-batch-size", type=int, default=None, help="override the manifest's build.max_batch_size")
    p.add_argument("--kv-cache-fraction", type=float, default=None, dest="kv_cache_free_gpu_mem_fraction",
                   help="trtllm: kv_cache_free_gpu_mem_fraction; llmapi/trtllm-serve: kv_cache_config."
                        "free_gpu_memory_fraction (default: manifest, else 0.9)")
    p.add_argument("--tp", type=int, default=None,
                   help="llmapi/trtllm-serve: tensor_parallel_size (default: the manifest's tp, else 1)")
    p.add_argument("--pp", type=int, default=None,
                   help="llmapi/trtllm-serve: pipeline_parallel_size (default: the manifest's pp, else 1)")
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="llmapi/trtllm-serve: max_num_tokens (default: the manifest's build.max_num_tokens)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="llmapi/trtllm-serve: max_seq_len (default: the manifest's build.max_seq_len)")
    p.add_argument("--batching-strategy", default=None, help="trtllm: inflight_fused_batching | inflight_batching | V1")
    p.add_argument("--gpu-device-ids", default=None, help="trtllm: e.g. 0,1 (default: 0..world_size-1)")
    p.add_argument("--queue-limit", type=int, default=None, dest="engine_queue_limit",
                   help="cpu: requests that may wait for a slot; more get 'engine busy' (default 64)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="cpu: KV-cache tokens (prompt + max_tokens) running requests may reserve "
                        "(default max_batch_size x max_seq_len)")
    p.add_argument("--runtime-dtype", choices=RUNTIME_DTYPES, default=None,
                   help="cpu: compute dtype of the PyTorch engine (default float32: the checkpoint's bf16/fp16 "
                        "weights are upcast once at load; CPUs without native bf16 run fp32 GEMMs faster)")


@command("package", "render a Triton model repository (ensemble, BLS, pre/postprocessing, engine) for engines/NAME")
@with_args(_package_args)
def _cmd_package(args: argparse.Namespace) -> int:
    from export.engine_dir import EngineDir
    from export.sources import load_spec
    from export.triton.package import package_repo, served_runtime

    t = time.perf_counter()
    out = package_repo(args.engine_dir, args.out, backend=args.backend, max_batch_size=args.max_batch_size,
                       kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
                       batching_strategy=args.batching_strategy, gpu_device_ids=args.gpu_device_ids,
                       engine_queue_limit=args.engine_queue_limit, kv_cache_tokens=args.kv_cache_tokens,
                       runtime_dtype=args.runtime_dtype, tp=args.tp, pp=args.pp, max_num_tokens=args.max_num_tokens,
                       max_seq_len=args.max_seq_len, runtime=args.runtime, overwrite=args.overwrite)
    if args.backend in ("llmapi", "trtllm-serve"):
        return _llm_api_summary(args, out, time.perf_counter() - t)
    build = EngineDir(args.engine_dir).manifest.build
    if args.json:
        print(json.dumps({"repo": str(out), "backend": args.backend, "seconds": round(time.perf_counter() - t, 3),
                          "max_input_len": int(build["max_input_len"]), "max_seq_len": int(build["max_seq_len"]),
                          "max_batch_size": args.max_batch_size or int(build["max_batch_size"])}, indent=2))
        return 0
    print(f"packaged {args.backend} model repository at {out} ({time.perf_counter() - t:.2f} s)")
    quant = load_spec(args.engine_dir).quant
    if not quant.is_none:
        runs = ("the engine's FP8 kernels" if args.backend == "trtllm"
                else f"emulated by the {served_runtime(args.backend, args.runtime)} runtime")
        print(f"quantization: {quant.describe()} ({runs})")
    print(limits_summary(build, args.max_batch_size))
    return 0


def _llm_api_summary(args: argparse.Namespace, out: Path, seconds: float) -> int:
    """What the LLM-API routes wrote, and how a GPU host runs it."""
    from export.triton import llmapi

    s = llmapi.settings_for(Path(args.engine_dir), tp=args.tp, pp=args.pp, max_batch_size=args.max_batch_size,
                            max_num_tokens=args.max_num_tokens, max_seq_len=args.max_seq_len,
                            free_gpu_memory_fraction=args.kv_cache_free_gpu_mem_fraction)
    if args.backend == "llmapi":
        run = {"serve here": f"python -m export serve {out}", "gpu host": s.triton_launch(str(Path(out).absolute()))}
    else:
        run = {"gpu host": str(Path(out) / llmapi.SERVE_SCRIPT)}
    if args.json:
        print(json.dumps({"repo": str(out), "backend": args.backend, "seconds": round(seconds, 3),
                          "llm_args": s.llm_args(), "run": run}, indent=2))
        return 0
    print(f"packaged {args.backend} files at {out} ({seconds:.2f} s): model {s.model}, tp {s.tp} pp {s.pp}, "
          f"max_batch_size {s.max_batch_size}, max_num_tokens {s.max_num_tokens}, max_seq_len {s.max_seq_len}, "
          f"free_gpu_memory_fraction {s.free_gpu_memory_fraction}")
    for where, cmd in run.items():
        print(f"  {where}: {cmd}")
    return 0


def limits_summary(build: dict, max_batch_size: int | None) -> str:
    """What a client may send: the limits every request is checked against."""
    n_in, n_seq = int(build["max_input_len"]), int(build["max_seq_len"])
    return (f"limits: prompts up to max_input_len {n_in} tokens; prompt + output up to max_seq_len {n_seq} "
            f"(so at least {n_seq - n_in} new tokens after a maximum-length prompt); "
            f"max_batch_size {max_batch_size or build['max_batch_size']}")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", help="model repository written by `package`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP and /generate")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (streaming)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    p.add_argument("--log-file", type=Path, default=None,
                   help="append tritonserver's own log to this file (default: kept only while it runs, and "
                        "its errors shown if it fails to start)")
    p.add_argument("-v", "--verbose", action="store_true", dest="show_log",
                   help="show tritonserver's log on stderr as it is written")


@command("serve", "run tritonserver on a model repository until Ctrl-C (no process left behind)")
@with_args(_serve_args)
def _cmd_serve(args: argparse.Namespace) -> int:
    from export.errors import ExportError
    from export.triton.llmapi import SERVE_SCRIPT
    from export.triton.server import start_server

    if (Path(args.repo) / SERVE_SCRIPT).is_file():
        raise ExportError(f"{args.repo} holds trtllm-serve files, not a Triton model repository: run "
                          f"{Path(args.repo) / SERVE_SCRIPT} on a GPU host with TensorRT-LLM")

    def _term(*_: object) -> None:
        raise KeyboardInterrupt

    # Both stop the server, whatever this process inherited: a shell script's `serve ... &` starts it
    # with SIGINT ignored, and Ctrl-C / `kill -INT` would then do nothing.
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    t = time.perf_counter()
    server = start_server(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, timeout=args.timeout, log_file=args.log_file)
    if args.show_log:
        follow_log(server)
    try:
        print(f"tritonserver ready in {time.perf_counter() - t:.1f} s: http {server.http_url}, "
              f"grpc {server.grpc_url}, metrics {server.host}:{server.metrics_port} (Ctrl-C stops)", flush=True)
        while server.alive():
            time.sleep(0.5)
        print(f"tritonserver exited with code {server.process.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver", file=sys.stderr)
        return 0
    finally:
        server.stop()


def follow_log(server: object) -> threading.Thread:
    """Copy what tritonserver writes to its log onto stderr, from where this run's output starts."""
    def run() -> None:
        pos = server.log_offset  # type: ignore[attr-defined]
        while True:
            try:
                with open(server.log_path, "rb") as f:  # type: ignore[attr-defined]
                    f.seek(pos)
                    chunk = f.read()
            except OSError:  # the work dir (and its log) went with the server
                return
            if chunk:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
                pos += len(chunk)
            elif not server.alive():  # type: ignore[attr-defined]
                return
            time.sleep(0.2)

    t = threading.Thread(target=run, name="tritonserver-log", daemon=True)
    t.start()
    return t


def _query_args(p: argparse.ArgumentParser) -> None:
    prompt_args(p, "the prompt text, sent as it is",
                "a user turn: rendered with the checkpoint's chat template (needs --tokenizer) and sent")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="--chat: the model repository `package` wrote, engines/NAME, or an HF checkpoint or "
                        "tokenizer directory (the server takes text, so the template is applied here)")
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8001 grpc / :8000 http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="grpc: streamed tokens (decoupled model); http: one /generate reply")
    p.add_argument("--model", default=None,
                   help="ensemble | tensorrt_llm_bls | tensorrt_llm (default: ensemble, else the LLM-API layout's "
                        "tensorrt_llm); the request contract follows the model's config")
    p.add_argument("--stream", action="store_true", help="stream pieces as they are generated")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the server's)")
    p.add_argument("--end-id", type=int, default=None,
                   help="token id that ends generation (default: the tokenizer's end-of-sequence)")
    p.add_argument("--stop-word", action="append", default=[], dest="stop_words",
                   help="stop when this text is generated (repeatable)")
    p.add_argument("--json", action="store_true", help="print the text and timings as one JSON object")


@command("query", "send a prompt to a served model (gRPC stream or HTTP generate); print text, TTFT, tokens/s")
@with_args(_query_args)
def _cmd_query(args: argparse.Namespace) -> int:
    from export.triton.client import Request, query

    req = Request(_prompt_text(args), max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, end_id=args.end_id, stop_words=tuple(args.stop_words),
                  stream=args.stream)
    res = query(req, url=args.url, protocol=args.protocol, model=args.model,
                on_text=None if args.json else (lambda s: print(s, end="", flush=True)))
    if args.json:
        print(json.dumps({"text": res.text, "tokens": res.tokens, "ttft_s": res.ttft_s,
                          "tokens_per_s": res.tokens_per_s, "total_s": round(res.total_s, 4)}, indent=2))
        return 0
    print()
    print(res.summary(), file=sys.stderr)
    return 0


def _prompt_text(args: argparse.Namespace) -> str:
    from export.chat import prompt_or_chat

    return prompt_or_chat(args.prompt, args.chat, args.system, args.tokenizer)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine_dirs", nargs="+", type=Path,
                   help="engines/NAME (served with the cpu flavour); several are reported side by side")
    p.add_argument("--concurrency", type=comma_ints("--concurrency"), default=(1, 4, 16),
                   help="concurrent streams per level")
    p.add_argument("--rounds", type=int, default=2,
                   help="requests per client and level (at least 24 requests per level and path in all)")
    p.add_argument("--pairs", type=int, default=6,
                   help="interleaved Triton/direct block pairs per level (both paths see the same machine drift)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (the end token is ignored)")
    p.add_argument("--model", choices=("ensemble", "tensorrt_llm_bls"), default="ensemble",
                   help="the served model the clients stream from")
    p.add_argument("--out", type=Path, default=default_path("out", "bench-serve"),
                   help="where report.json and tokens_per_s.png go (new, or ours with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a previous bench-serve output")
    p.add_argument("--backend", choices=("cpu", "onnx"), default="cpu",
                   help="cpu: the reference runtime's repository (--runtime picks which); onnx: the older "
                        "spelling of --runtime onnx")
    p.add_argument("--runtime", choices=registry.names(), default=None,
                   help=f"what Triton's engine model and the direct side run (default: what `package` serves) "
                        f"-- {registry.describe()}")


def _register_bench() -> None:
    from export.commands.bench import bench

    @bench("serve", "streaming TTFT / inter-token latency / tokens/s at concurrency 1,4,16: Triton vs the direct "
                    "runtime in the same run; JSON, table and a PNG plot", _bench_args)
    def _bench_serve(args: argparse.Namespace) -> int:
        import json

        from export.io.output import check_output, output_dir
        from export.triton.bench import bench_serve, format_report, plot, summary

        check_output(args.out, inputs=args.engine_dirs, overwrite=args.overwrite)
        rep = bench_serve(args.engine_dirs, levels=args.concurrency, rounds=args.rounds, max_tokens=args.max_tokens,
                          model=args.model, backend=args.backend, pairs=args.pairs, runtime=args.runtime)
        rep["summary"] = summary(rep)
        text = json.dumps(rep, indent=2)
        with output_dir(args.out, inputs=args.engine_dirs, overwrite=args.overwrite) as tmp:
            (tmp / "report.json").write_text(text + "\n")
            plot(rep, tmp / "tokens_per_s.png")
        print(format_report(rep))
        print(text)
        print(f"wrote {args.out / 'report.json'} and {args.out / 'tokens_per_s.png'}")
        return 0


_register_bench()

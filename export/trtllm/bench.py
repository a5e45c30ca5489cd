"""`bench convert`: convert --tp 4 throughput against a plain copy of the same files, and peak RSS,
with the embedding whole on every rank (TRT-LLM's default) and vocab-split (`--parallel-embedding`).

The source is a synthetic checkpoint with real Llama-3.1-8B shapes (hidden 4096, 32 heads, 8 kv
heads, FFN 14336, vocab 128256, bf16), generated once into a cache directory. Each measurement runs
in a fresh child process (so its peak RSS is its own) on a warm page cache, and ends with `sync`, so
both sides pay for getting their bytes to disk. Two model sizes show whether RSS grows with size.
`fp8`: the same shapes as a ModelOpt FP8 checkpoint (FP8 linears, per-tensor scales, FP8 KV cache,
lm_head excluded), so the FP8 path (requantized q/k/v, scale tensors) is measured the same way.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from export.mapping import Mapping
from export.quantization import Quantization
from export.spec import FFN, LLAMA, Attention, AttentionKind, FFNKind, Layer, ModelSpec, RopeScaling

REPO = Path(__file__).resolve().parents[2]
LLAMA_31_8B_LAYERS = 32
FP8_BENCH = Quantization("FP8", "FP8", ("lm_head",))  # as NVIDIA's FP8 checkpoints: lm_head left in bf16


def llama8b_shapes(layers: int) -> ModelSpec:
    """Llama-3.1-8B's shapes, with `layers` of its 32 decoder layers."""
    layer = Layer(Attention(AttentionKind.FULL, 8), FFN(FFNKind.SWIGLU, 14336))
    return ModelSpec(hidden=4096, heads=32, head_dim=128, vocab=128256, layers=(layer,) * layers,
                     rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), norm_eps=1e-5,
                     dtype="bfloat16", max_position_embeddings=131072, architecture=LLAMA,
                     passthrough={"bos_token_id": 128000, "eos_token_id": 128001})


def ensure_source(cache: Path, layers: int, fp8: bool = False) -> Path:
    """The cached synthetic checkpoint, generated on first use (about 0.44 GB per layer + 2.1 GB;
    FP8: about 0.22 GB per layer + 2.1 GB)."""
    from export.synthetic import write_random_checkpoint

    spec = llama8b_shapes(layers).with_quant(FP8_BENCH) if fp8 else llama8b_shapes(layers)
    path = Path(cache) / f"llama3.1-8b-shapes-{layers}L{'-fp8' if fp8 else ''}"
    if (path / "config.json").is_file() and ModelSpec.load(path) == spec:
        return path
    print(f"generating {path} (once) ...", file=sys.stderr)
    return write_random_checkpoint(path, spec, seed=0, std=0.02, max_shard_bytes=2 << 30, overwrite=True)


def _warm(src: Path) -> None:
    """Read the source once so copy and convert both start from a warm page cache."""
    for p in sorted(src.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def _child(kind: str, src: Path, out: Path, tp: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it reports its own time and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "export.trtllm.bench", kind, str(src), str(out), str(tp)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"bench child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_copy(src: Path, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    out.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, out / p.name)
    os.sync()
    return {"seconds": time.perf_counter() - start, "bytes_read": _size(src), "bytes_written": _size(out)}


def _run_convert(src: Path, out: Path, tp: int, embedding_shard: int | None = None) -> dict[str, Any]:
    import torch

    from export.trtllm.convert import convert

    torch.set_num_threads(1)
    start = time.perf_counter()
    res = convert(src, out, tp=tp, progress=False, embedding_shard=embedding_shard)
    os.sync()
    return {"seconds": time.perf_counter() - start, "bytes_read": res.bytes_read, "bytes_written": res.bytes_written}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure(src: Path, work: Path, tp: int, repeats: int = 2) -> dict[str, Any]:
    """Copy and convert of one source, alternated `repeats` times; the best run of each is kept
    (a VM's disk throughput swings 2x between runs; both sides get the same chances). Outputs are
    deleted after each run."""
    row: dict[str, Any] = {"source": str(src), "source_bytes": _size(src),
                           "layers": ModelSpec.load(src).num_layers}
    runs: dict[str, list[dict[str, Any]]] = {"copy": [], "convert": [], "convert_pe": []}
    for _ in range(repeats):
        for kind in runs:
            out = work / f"{src.name}-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            _warm(src)
            runs[kind].append(_child(kind, src, out, tp))
            shutil.rmtree(out, ignore_errors=True)
    for kind, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        row[kind] = {**best, "seconds_all": [round(r["seconds"], 2) for r in rs],
                     "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs)}
        row[kind]["gb_per_s"] = row["source_bytes"] / best["seconds"] / 1e9
        row[kind]["written_gb_per_s"] = best["bytes_written"] / best["seconds"] / 1e9
    row["ratio"] = row["convert"]["gb_per_s"] / row["copy"]["gb_per_s"]
    row["ratio_pe"] = row["convert_pe"]["gb_per_s"] / row["copy"]["gb_per_s"]
    # with the whole embedding on every tp rank (TRT-LLM's default) convert writes more than it reads;
    # --parallel-embedding writes each embedding row once
    row["written_ratio"] = row["convert"]["written_gb_per_s"] / row["copy"]["written_gb_per_s"]
    row["written_bytes_saved_pe"] = row["convert"]["bytes_written"] - row["convert_pe"]["bytes_written"]
    return row


def bench_convert(cache: Path, *, sizes: tuple[int, ...] = (16, 32), tp: int = 4, repeats: int = 2,
                  fp8: bool = False) -> dict[str, Any]:
    Mapping(tp)  # validates tp
    work = Path(cache) / "bench-out"
    rows = [measure(ensure_source(cache, n, fp8), work, tp, repeats) for n in sizes]
    shutil.rmtree(work, ignore_errors=True)
    rss = [r["convert"]["peak_rss_bytes"] for r in rows]
    return {"tp": tp, "repeats": repeats, "fp8": fp8, "sizes": rows, "peak_rss_growth_bytes": max(rss) - min(rss),
            "min_ratio": min(r["ratio"] for r in rows), "min_ratio_pe": min(r["ratio_pe"] for r in rows),
            "min_written_ratio": min(r["written_ratio"] for r in rows), "target_ratio": 0.7}


def format_report(rep: dict[str, Any]) -> str:
    kind = "FP8 (ModelOpt per-tensor, FP8 KV cache) sources; " if rep.get("fp8") else ""
    lines = [kind + "GB/s = source bytes per second (written: output bytes per second); "
             f"best of {rep.get('repeats', 1)} "
             "alternated runs each (all run times in the JSON)",
             f"{'model':<24} {'mode':<10} {'source':>8} {'written':>8} {'copy GB/s':>10} {'convert GB/s':>13} "
             f"{'ratio':>6} {'written ratio':>14} {'peak RSS copy':>14} {'peak RSS convert':>17}"]
    for r in rep["sizes"]:
        c = r["copy"]
        name = Path(r["source"]).name
        for mode, key in (("whole", "convert"), ("split", "convert_pe")):
            v = r[key]
            written_ratio = v["written_gb_per_s"] / c["written_gb_per_s"]
            lines.append(f"{name:<24} {mode:<10} {r['source_bytes'] / 1e9:>6.2f}GB {v['bytes_written'] / 1e9:>6.2f}GB "
                         f"{c['gb_per_s']:>10.2f} {v['gb_per_s']:>13.2f} {v['gb_per_s'] / c['gb_per_s']:>6.2f} "
                         f"{written_ratio:>14.2f} {c['peak_rss_bytes'] / 2**20:>11.0f}MiB "
                         f"{v['peak_rss_bytes'] / 2**20:>14.0f}MiB")
    ok = rep["min_ratio"] >= rep["target_ratio"]
    lines.append(f"convert --tp {rep['tp']} vs plain copy: {rep['min_ratio']:.2f}x source bytes/s at worst "
                 f"(target >= {rep['target_ratio']}x: {'met' if ok else 'NOT met'}), "
                 f"{rep['min_written_ratio']:.2f}x written bytes/s; peak RSS grows by "
                 f"{rep['peak_rss_growth_bytes'] / 2**20:.0f} MiB between the sizes")
    saved = [r["written_bytes_saved_pe"] for r in rep["sizes"]]
    lines.append(f"--parallel-embedding (split): {rep['min_ratio_pe']:.2f}x source bytes/s at worst, "
                 f"{min(saved) / 1e9:.2f} GB less written (the embedding once instead of tp times)")
    return "\n".join(lines)


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: Linux carries that across exec
    from the forked parent, so a child of a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_main(argv: list[str]) -> None:
    kind, src, out, tp = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3])
    res = (_run_copy(src, out) if kind == "copy"
           else _run_convert(src, out, tp, embedding_shard=0 if kind == "convert_pe" else None))
    res["peak_rss_bytes"] = peak_rss()
    print(json.dumps(res))


if __name__ == "__main__":
    _child_main(sys.argv[1:])

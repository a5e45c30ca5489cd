"""llama.cpp's own decode figure for `bench decode --against-llama-cpp`: one `llama-bench` run.

`llama-bench -m FILE -p 0 -n 64 -t THREADS -o json` prints a JSON list of tests; the tg64 test's
`avg_ts` is its batch-1 decode tokens/s. Run in the same `bench decode` invocation as ours, so the
ratio sees the same machine load.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from export.errors import ExportError


def llama_bench_command(binary: Path, gguf: Path, threads: int, tokens: int = 64) -> list[str]:
    return [str(binary), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads), "-o", "json"]


def parse_llama_bench(text: str, where: str = "llama-bench") -> float:
    """The decode tokens/s (`avg_ts` of the test with n_gen > 0) from llama-bench's JSON output."""
    try:
        tests = json.loads(text)
        rates = [float(t["avg_ts"]) for t in tests if int(t.get("n_gen", 0)) > 0]
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{where}: output is not llama-bench JSON with avg_ts ({e})") from None
    if not rates:
        raise ExportError(f"{where}: output has no decode (n_gen > 0) test")
    return rates[0]


def run_llama_bench(binary: Path, gguf: Path, threads: int, timeout: float = 600) -> float:
    """llama.cpp's batch-1 decode tokens/s on `gguf`; one clear line when it cannot be had."""
    if not Path(binary).is_file():
        raise ExportError(f"--against-llama-cpp {binary}: no such file (a llama-bench binary)")
    if not Path(gguf).is_file():
        raise ExportError(f"--gguf {gguf}: no such file (the model converted by convert_hf_to_gguf.py)")
    try:
        done = subprocess.run(llama_bench_command(binary, gguf, threads), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExportError(f"--against-llama-cpp {binary}: could not run it ({e})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"--against-llama-cpp {binary}: exited {done.returncode}: {last}")
    return parse_llama_bench(done.stdout, str(binary))

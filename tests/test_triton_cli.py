"""`package`, `serve`, `query` as a user runs them: real subprocesses, real server, Ctrl-C, no leftovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from triton_support import make_engine_dir

from export.triton.server import ServerError, free_port, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def export_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "export", *args]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(export_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (tritonserver, python stubs, engine workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    engine_dir = make_engine_dir(root, tp=2)
    res = run("package", str(engine_dir), "--out", str(root / "repo"), "--backend", "cpu")
    assert res.returncode == 0, res.stderr
    assert "packaged cpu model repository" in res.stdout
    build = json.loads((engine_dir / "manifest.json").read_text())["build"]
    assert f"prompts up to max_input_len {build['max_input_len']} tokens" in res.stdout
    return root / "repo"


def test_serve_query_then_ctrl_c_leaves_nothing_behind(repo, tmp_path):
    http, grpc, metrics = free_port(), free_port(), free_port()
    log_file = tmp_path / "triton.log"
    log_file.write_text("an earlier run\n")
    serve = subprocess.Popen(export_cmd("serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
                                        "--metrics-port", str(metrics), "--log-file", str(log_file), "-v"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = serve.stdout.readline()
        assert "tritonserver ready" in line, serve.stderr.read()
        assert f"http 127.0.0.1:{http}" in line  # loopback by default
        tree = descendants(serve.pid)
        assert len(tree) >= 3  # tritonserver + python stubs (+ the engine's 2 TP workers)
        streamed = run("query", "héllo 中文", "--url", f"127.0.0.1:{grpc}", "--stream", "--max-tokens", "8")
        assert streamed.returncode == 0, streamed.stderr
        assert "time to first token" in streamed.stderr and "tokens/s" in streamed.stderr
        single = run("query", "héllo 中文", "--url", f"127.0.0.1:{http}", "--protocol", "http", "--max-tokens", "8")
        assert single.returncode == 0 and single.stdout == streamed.stdout
        bad = run("query", "x", "--url", f"127.0.0.1:{grpc}", "--max-tokens", "0")
        assert bad.returncode == 2 and "max_tokens must be >= 1" in bad.stderr
        as_json = run("query", "héllo 中文", "--url", f"127.0.0.1:{grpc}", "--max-tokens", "8", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["text"] + "\n" == streamed.stdout
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert 'nv_inference_request_success{model="ensemble"' in text
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        log = log_file.read_text()  # appended to, never replaced; -v showed the same lines on stderr
        assert log.startswith("an earlier run\n") and "Started GRPCInferenceService" in log
        assert "Started GRPCInferenceService" in serve.stderr.read()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if alive(p)]
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def test_a_model_that_fails_to_load_is_reported_with_the_servers_error(repo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(repo / "preprocessing", broken / "preprocessing")
    cfg = broken / "preprocessing/config.pbtxt"
    text = cfg.read_text()
    assert 'string_value: "tensorrt_llm/engine/tokenizer"' in text  # relative to the repository (see the move test)
    cfg.write_text(text.replace('"tensorrt_llm/engine/tokenizer"', f'"{tmp_path / "nowhere"}"'))
    with pytest.raises(ServerError, match=r"(?s)preprocessing.*no tokenizer\.json"):
        start_server(broken, timeout=120)


def test_a_moved_repository_serves_without_its_engine_dir(tmp_path):
    """The repository holds what its python models read (engine/: hard links, or copies across
    filesystems) and names it relative to itself: moved elsewhere, with engines/NAME gone, it serves."""
    engine_dir = make_engine_dir(tmp_path, tp=1)
    r = run("package", str(engine_dir), "--out", str(tmp_path / "repo"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repo"] == str(tmp_path / "repo")
    for cfg in (tmp_path / "repo").glob("*/config.pbtxt"):
        assert str(engine_dir) not in cfg.read_text(), cfg
    moved = tmp_path / "elsewhere" / "deployed"
    moved.parent.mkdir()
    (tmp_path / "repo").rename(moved)
    engine_dir.rename(tmp_path / "engines" / "gone")
    with start_server(moved, timeout=240) as server:
        res = run("query", "the quick", "--url", server.grpc_url, "--max-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == 4


def test_ctrl_c_stops_serve_even_when_started_with_sigint_ignored(repo):
    """`serve ... &` in a shell script starts it with SIGINT ignored (POSIX sh does that for
    background jobs); `kill -INT` must still stop the server cleanly."""
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    ports = [str(free_port()) for _ in range(3)]
    serve = subprocess.Popen(export_cmd("serve", str(repo), "--http-port", ports[0], "--grpc-port", ports[1],
                                        "--metrics-port", ports[2]),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True, preexec_fn=ignore_sigint)
    try:
        assert "tritonserver ready" in serve.stdout.readline()
        tree = descendants(serve.pid)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in tree), "processes outlived serve"
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)

"""The output policy as a user meets it: the real CLI in subprocesses, tiny checkpoints built here.

Never destroy what we did not create: a user's directory, a file, the source itself are refused
(exit 2, one `error:` line, nothing written, inputs byte-identical); our own previous output is
replaced only with --overwrite; running out of space is one clear error with nothing left behind;
killed runs' temp dirs are removed beside any later output and by `clean`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.fusion.plan import FusionPlan
from export.io.output import MARKER, is_ours, judge
from export.spec import ModelSpec
from export.triton.package import package_repo
from export.trtllm.convert import convert
from tests.conftest import ffn_only, full
from tests.trtllm_helpers import make_source

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096


def tiny_spec() -> ModelSpec:
    """Four layers with an attention-free pair (1, 2) to fuse; about 1.2 MB of fp32 weights."""
    return ModelSpec(hidden=64, heads=4, head_dim=16, vocab=128,
                     layers=(full(2, 256), ffn_only(256), ffn_only(512), full(2, 256)),
                     dtype="float32", max_position_embeddings=256,
                     passthrough={"bos_token_id": 1, "eos_token_id": 2})


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with exactly one `error:` line (no traceback) that says each of `needles`."""
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) with its sha256: what must not change."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A source checkpoint (with tokenizer files), a plan file and a converted engine dir."""
    root = tmp_path_factory.mktemp("policy")
    source = make_source(root / "models" / "src", tiny_spec())
    plan = root / "plan.json"
    FusionPlan([(1, 2)]).save(plan)
    engine = convert(source, root / "engines" / "e", tp=1, progress=False).out
    return {"root": root, "source": source, "plan": plan, "engine": engine}


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\0" * 100)
    return path


# ---- what is not ours survives ------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["convert", "fuse", "package"])
def test_a_user_directory_at_out_survives(world, tmp_path, cmd):
    out = user_dir(tmp_path / "mine")
    before = snapshot(out)
    args = {"convert": ["convert", world["source"], "--tp", "1"],
            "fuse": ["fuse", world["source"], "--plan", world["plan"]],
            "package": ["package", world["engine"]]}[cmd]
    refused(run(*args, "--out", out, "--overwrite"), str(out), "not an output of this toolkit")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize(("where", "why"), [("source", "is the input"), ("parent", "contains the input"),
                                            ("inside", "lies inside the input")])
def test_out_overlapping_the_source_is_refused_and_the_source_is_intact(world, where, why):
    source = world["source"]
    out = {"source": source, "parent": source.parent, "inside": source / "sub" / "e"}[where]
    before = snapshot(source.parent)
    refused(run("convert", source, "--tp", "1", "--out", out, "--overwrite"), why, str(source))
    assert snapshot(source.parent) == before and not (source / "sub").exists()


@pytest.mark.slow
def test_fuse_out_may_not_contain_the_plan_and_package_not_the_engine(world, tmp_path):
    plan_dir = tmp_path / "plans"
    plan_dir.mkdir()
    plan = plan_dir / "plan.json"
    shutil.copy(world["plan"], plan)
    refused(run("fuse", world["source"], "--plan", plan, "--out", plan_dir, "--overwrite"), "contains the input")
    assert plan.read_bytes() == world["plan"].read_bytes()
    before = snapshot(world["engine"])
    refused(run("package", world["engine"], "--out", world["engine"] / "repo"), "lies inside the input")
    assert snapshot(world["engine"]) == before


@pytest.mark.slow
def test_an_existing_file_at_out_is_refused(world, tmp_path):
    f = tmp_path / "engine.txt"
    f.write_text("not a directory")
    refused(run("convert", world["source"], "--tp", "1", "--out", f, "--overwrite"), "not a directory")
    assert f.read_text() == "not a directory"
    refused(run("plan", world["source"], "--out", world["source"] / "config.json", "--overwrite"), "lies inside")
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    refused(run("plan", world["source"], "--out", plan), "pass --overwrite")
    assert plan.read_text() == "{}"


# ---- our own previous output ----------------------------------------------------------------
@pytest.mark.slow
def test_our_previous_output_is_replaced_only_with_overwrite(world, tmp_path):
    out = convert(world["source"], tmp_path / "e", tp=1, progress=False).out
    assert json.loads((out / MARKER).read_text())["entries"] == ["checkpoint", "manifest.json", "tokenizer"]
    before = snapshot(out)
    refused(run("convert", world["source"], "--tp", "2", "--out", out), "previous output", "--overwrite")
    assert snapshot(out) == before
    res = run("convert", world["source"], "--tp", "2", "--out", out, "--overwrite", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (out / "checkpoint").glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temp or old dir left beside it

    (out / "my-notes.txt").write_text("added by hand")  # a user's file inside our output is theirs
    refused(run("convert", world["source"], "--tp", "1", "--out", out, "--overwrite"), "my-notes.txt")
    assert (out / "my-notes.txt").read_text() == "added by hand"


@pytest.mark.slow
def test_outputs_from_before_the_marker_are_recognised(world, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(world["engine"], out)
    (out / MARKER).unlink()  # as `convert` wrote it before this policy: manifest.json only
    (package_repo(world["engine"], tmp_path / "repo") / MARKER).unlink()
    for target, args in ((out, ["convert", world["source"], "--tp", "1", "--no-progress"]),
                         (tmp_path / "repo", ["package", world["engine"]])):
        res = run(*args, "--out", target, "--overwrite")
        assert res.returncode == 0, res.stderr
        assert (target / MARKER).is_file()


def test_a_pre_marker_engine_subdir_is_recognised_through_its_manifest(world, tmp_path):
    engine = tmp_path / "e"
    shutil.copytree(world["engine"], engine)
    (engine / "onnx").mkdir()
    (engine / "stray").mkdir()
    m = json.loads((engine / "manifest.json").read_text())
    m["engines"]["onnx"] = {"path": "onnx"}
    (engine / "manifest.json").write_text(json.dumps(m))
    assert is_ours(engine / "onnx") and not is_ours(engine / "stray")


# ---- space ------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def pages(path: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) for p in path.rglob("*") if p.is_file())


def test_free_space_is_checked_before_writing(world, small_fs):
    (small_fs / "filler").write_bytes(b"\0" * (3 << 20))  # 1 MiB left, the output needs about 1.2 MB
    res = run("convert", world["source"], "--tp", "1", "--out", small_fs / "e")
    refused(res, f"{small_fs / 'e'}: needs ", " free on ", str(small_fs))
    assert [p.name for p in small_fs.iterdir()] == ["filler"]


@pytest.mark.slow
def test_running_out_of_space_mid_write_is_one_clear_error_and_leaves_nothing(world, small_fs):
    """A real ENOSPC from a real (tmpfs) filesystem: the free space passes the precheck (which counts
    the tensors and tokenizer bytes) but not the write (headers, config, manifest, page rounding)."""
    free = shutil.disk_usage(small_fs).free
    room = (pages(world["engine"]) - 3) * PAGE  # >= the planned bytes, < what the files occupy
    (small_fs / "filler").write_bytes(b"\0" * (free - room))
    res = run("convert", world["source"], "--tp", "1", "--out", small_fs / "e", "--no-progress")
    refused(res, f"{small_fs / 'e'}: no space left on device on {small_fs} after writing", "nothing was written")
    assert [p.name for p in small_fs.iterdir()] == ["filler"]


# ---- temp dirs of killed runs ---------------------------------------------------------------
HOLD = """
import sys, time
from export.io.output import output_dir
with output_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def hold_temp_dir(target: Path) -> tuple[subprocess.Popen, Path]:
    """A real writer, stopped in the middle of its output; returns it and its temp dir."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.slow
def test_stale_temp_dirs_are_removed_beside_any_target_and_by_clean(world, tmp_path):
    parent = tmp_path / "engines"
    live, live_tmp = hold_temp_dir(parent / "b")
    killed, dead_tmp = hold_temp_dir(parent / "a")  # after `b`: opening `b` would have cleaned it away
    killed.kill()
    killed.wait()
    reused = parent / f".c.tmp-{os.getpid()}-1-abcdef12"  # our live pid, another start time: a reused pid
    reused.mkdir()
    shutil.copy(dead_tmp / MARKER, reused / MARKER)
    lookalike = parent / ".d.tmp-1-2-abcdef12"  # our name pattern, but no marker: not ours
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("x")
    try:
        assert judge(dead_tmp).stale and judge(reused).stale and not judge(live_tmp).stale
        assert judge(lookalike) is None

        res = run("clean", tmp_path, "--dry-run")
        assert res.returncode == 0, res.stderr
        assert f"would remove {dead_tmp}" in res.stdout and f"would remove {reused}" in res.stdout
        assert f"kept {live_tmp}" in res.stdout and str(lookalike) not in res.stdout
        assert dead_tmp.is_dir() and reused.is_dir()

        res = run("convert", world["source"], "--tp", "1", "--out", parent / "other", "--no-progress")
        assert res.returncode == 0, res.stderr  # another target in the same parent: the stale ones go
        assert not dead_tmp.exists() and not reused.exists()
        assert live_tmp.is_dir() and (lookalike / "keep.txt").is_file()
    finally:
        live.kill()
        live.wait()
    res = run("clean", tmp_path)
    assert res.returncode == 0 and f"removed {live_tmp}" in res.stdout, res.stdout + res.stderr
    assert sorted(p.name for p in parent.iterdir()) == [lookalike.name, "other"]


@pytest.mark.slow
def test_clean_keeps_an_old_format_temp_dir_until_it_is_idle(tmp_path):
    old = tmp_path / ".x.tmp-999999-abcdef12"  # the pre-marker name: pid and tag only
    old.mkdir()
    (old / "rank0.safetensors").write_bytes(b"\0" * 10)
    assert not judge(old).stale  # idle for less than an hour
    hour_ago = time.time() - 7200
    os.utime(old / "rank0.safetensors", (hour_ago, hour_ago))
    os.utime(old, (hour_ago, hour_ago))
    assert judge(old).stale
    res = run("clean", tmp_path)
    assert res.returncode == 0 and not old.exists(), res.stdout + res.stderr
    refused(run("clean", tmp_path / "nope"), "not a directory")

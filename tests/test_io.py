"""Checkpoint reader/writer: round trips, atomic output, and every bad checkpoint's error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from export.errors import CheckpointError
from export.io.output import output_dir
from export.io.paths import checkpoint_file
from export.io.reader import CheckpointReader
from export.io.writer import HFCheckpointWriter, copy_sidecars
from export.sharding import shard_for
from export.synthetic import write_random_checkpoint
from export.tensors import Role, model_tensors
from tests.conftest import hetero_spec, write_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "m", hetero_spec(), seed=1)


@pytest.mark.parametrize("max_shard", [1 << 40, 50_000])
def test_round_trip_single_and_sharded(tmp_path, max_shard):
    spec = hetero_spec()
    path = write_random_checkpoint(tmp_path / "m", spec, seed=3, max_shard_bytes=max_shard)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if max_shard < 1 << 40:
        assert len(files) > 2 and (path / "model.safetensors.index.json").is_file()
    else:
        assert files == ["model.safetensors"]
    reader = CheckpointReader(path)
    refs = reader.validate(spec)
    from safetensors.torch import load_file
    everything = {}
    for f in files:
        everything.update(load_file(path / f))
    assert set(everything) == {r.hf_name for r in refs}
    for r in refs:
        assert torch.equal(reader.read(r), everything[r.hf_name])


def test_sliced_read_equals_slice_of_full(ckpt):
    spec = hetero_spec()
    reader = CheckpointReader(ckpt)
    for ref in model_tensors(spec):
        for tp in (2, 4):
            for rank in range(tp):
                shard = shard_for(spec, ref, rank, tp)
                piece = reader.read(ref, shard)
                assert tuple(piece.shape) == shard.shape(ref.shape), ref


def test_bf16_round_trip(tmp_path):
    spec = hetero_spec("bfloat16")
    path = write_random_checkpoint(tmp_path / "b", spec, seed=2)
    reader = CheckpointReader(path)
    ref = reader.validate(spec)[3]
    assert reader.read(ref).dtype == torch.bfloat16


def _rewrite(path: Path, drop: str | None = None, change: dict | None = None) -> None:
    """Rewrite model.safetensors without one tensor or with replaced ones."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    if drop:
        del tensors[drop]
    tensors.update(change or {})
    save_file(tensors, path / "model.safetensors")


def _problems(path, spec=None):
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(path).validate(spec or hetero_spec())
    return str(e.value)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, drop="model.layers.3.mlp.down_proj.weight")
    msg = _problems(ckpt)
    assert "missing tensor model.layers.3.mlp.down_proj.weight (down of layer 3" in msg


def test_wrong_shape_and_dtype_reported_together(ckpt):
    _rewrite(ckpt, change={"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 64),
                           "model.norm.weight": torch.zeros(64, dtype=torch.float16)})
    msg = _problems(ckpt)
    assert "2 problem(s)" in msg
    assert "model.layers.1.self_attn.k_proj.weight: shape [8, 64], expected [32, 64]" in msg
    assert "model.norm.weight: dtype float16, expected float32" in msg


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, change={"model.layers.7.mlp.gate_proj.weight": torch.zeros(256, 64)})
    assert "unexpected tensor model.layers.7.mlp.gate_proj.weight" in _problems(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    msg = _problems(ckpt)
    assert "model.safetensors" in msg and "truncated" in msg


def test_index_naming_missing_file(tmp_path):
    path = write_random_checkpoint(tmp_path / "s", hetero_spec(), max_shard_bytes=50_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    assert f"index names file {victim}, which does not exist" in _problems(path)


def test_index_disagreeing_with_files(tmp_path):
    path = write_random_checkpoint(tmp_path / "s", hetero_spec(), max_shard_bytes=50_000)
    ip = path / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    files = sorted(set(index["weight_map"].values()))
    wm = index["weight_map"]
    wm["model.norm.weight"] = files[0] if wm["model.norm.weight"] != files[0] else files[1]
    ip.write_text(json.dumps(index))
    assert "model.norm.weight" in _problems(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_refused(tmp_path, name):
    d = tmp_path / "p"
    d.mkdir()
    (d / name).write_bytes(b"\x80\x04not really")
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"pickle checkpoint.*refused"):
        CheckpointReader(d)
    with pytest.raises(CheckpointError, match="refused"):
        CheckpointReader(d / name)


def test_writer_rejects_wrong_tensor_and_unwritten(tmp_path):
    w = HFCheckpointWriter(tmp_path, [("a", torch.float32, (2, 3)), ("b", torch.float32, (4,))])
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_atomic_dir_removes_partial_output_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), output_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


KILL_SCRIPT = """
import sys, time, torch
from export.io.output import output_dir
from export.io.writer import HFCheckpointWriter
with output_dir(sys.argv[1]) as tmp:
    w = HFCheckpointWriter(tmp, [(f"t{i}", torch.float32, (256, 256)) for i in range(50)], 1 << 20)
    w.write("t0", torch.zeros(256, 256))
    print("started", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_killed_writer_leaves_no_output_and_next_run_succeeds(tmp_path):
    target = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # the debris is hidden
    write_random_checkpoint(target, hetero_spec())
    CheckpointReader(target).validate(hetero_spec())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # stale temp dir cleaned up


def test_existing_output_replaced_only_when_complete(tmp_path):
    target = write_random_checkpoint(tmp_path / "m", hetero_spec(), seed=1)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError), output_dir(target, overwrite=True):
        raise RuntimeError
    assert (target / "model.safetensors").read_bytes() == before
    time.sleep(0)


def test_sidecars_copied(tmp_path, ckpt):
    for name in ("generation_config.json", "modeling_decilm.py"):
        (ckpt / name).write_text("{}")
    write_tokenizer(ckpt)
    out = tmp_path / "o"
    out.mkdir()
    copied = copy_sidecars(ckpt, out)
    assert copied == ["generation_config.json", "modeling_decilm.py", "tokenizer.json"]


def test_tied_checkpoint_reads_embedding_for_lm_head(tmp_path):
    from dataclasses import replace
    spec = replace(hetero_spec(), tie_embeddings=True)
    path = write_random_checkpoint(tmp_path / "t", spec)
    reader = CheckpointReader(path)
    reader.validate(spec)
    from export.tensors import global_ref
    assert torch.equal(reader.read(global_ref(spec, Role.LM_HEAD)), reader.get("model.embed_tokens.weight"))
    assert Role.LM_HEAD not in {r.role for r in model_tensors(spec)}


# ---- paths stay inside the checkpoint --------------------------------------------------------
def _hub(tmp_path: Path, repo: str = "models--org--m") -> Path:
    snap = tmp_path / repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / repo / "blobs").mkdir()
    (tmp_path / repo / "blobs" / "h1").write_text("{}")
    return snap


def test_hub_cache_links_into_their_own_blobs_are_followed(tmp_path):
    snap = _hub(tmp_path)
    (snap / "config.json").symlink_to("../../blobs/h1")
    assert checkpoint_file(snap, "config.json") == snap / "config.json"


@pytest.mark.parametrize("layout", ["other repo's blobs", "not under snapshots", "not a models-- repo"])
def test_links_that_only_look_like_the_hub_cache_are_refused(tmp_path, layout):
    snap = _hub(tmp_path, "datasets--org--m" if layout == "not a models-- repo" else "models--org--m")
    other = _hub(tmp_path, "models--org--other")
    if layout == "not under snapshots":
        snap = snap.parent.parent / "refs" / "abc123"
        snap.mkdir(parents=True)
    target = (other if layout == "other repo's blobs" else snap).parent.parent / "blobs" / "h1"
    (snap / "config.json").symlink_to(target)
    with pytest.raises(CheckpointError, match=r"config\.json is a symlink to .*, outside the checkpoint"):
        checkpoint_file(snap, "config.json")
    assert checkpoint_file(snap, "config.json", follow_symlinks=True) == snap / "config.json"


@pytest.mark.parametrize("name", ["../x.safetensors", "a/../../x.safetensors", "/etc/passwd", "", "a\\..\\b"])
def test_names_that_climb_out_are_refused_even_when_following_links(tmp_path, name):
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        checkpoint_file(tmp_path, name, follow_symlinks=True)


def test_links_inside_the_checkpoint_are_fine_and_broken_ones_named(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "alias.json").symlink_to("real.json")
    assert checkpoint_file(tmp_path, "alias.json").is_file()
    (tmp_path / "gone.json").symlink_to("missing.json")
    with pytest.raises(CheckpointError, match=r"gone\.json is a symlink to missing\.json, which does not exist"):
        checkpoint_file(tmp_path, "gone.json")


def test_sidecars_never_copy_a_linked_directory(tmp_path, ckpt):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "big.bin.txt").write_text("x")
    (ckpt / "inside").mkdir()
    (ckpt / "inside" / "card.md").write_text("# card")
    (ckpt / "inside" / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(CheckpointError, match="inside/up is a symlink to a directory"):
        copy_sidecars(ckpt, tmp_path / "o")
    (ckpt / "inside" / "up").unlink()
    (ckpt / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(CheckpointError, match="linked is a symlink to a directory"):
        copy_sidecars(ckpt, tmp_path / "o", follow_symlinks=True)
    (ckpt / "linked").unlink()
    out = tmp_path / "o"
    out.mkdir()
    assert copy_sidecars(ckpt, out) == ["inside/card.md"]
    assert (out / "inside" / "card.md").read_text() == "# card"

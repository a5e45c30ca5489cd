"""Bad input, table-driven: each `Case` corrupts a fresh copy of one tiny valid checkpoint one way, and
every command that reads checkpoints must refuse it the same way: exit code 2, one `error:` line on
stderr naming the file (and tensor) at fault, no traceback, no output, the source untouched.

To add a row, append a `Case` to `CASES` (or to a new list joined into it): `corrupt` gets the
checkpoint directory (sharded: two `model-0000i-of-00002.safetensors` + index, config.json,
tokenizer.json); `expect` is a substring of the error line, where `{shard}` and `{tensor}` stand for
the first shard and its first tensor; `commands` says which commands must refuse it.

Every (case, command) pair runs in-process through `export.cli.main` (the function `python -m export`
calls), which keeps the module fast; `test_real_cli_in_subprocess` runs a few rows through the real
interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from export.cli import main
from export.spec import ModelSpec
from export.synthetic import write_random_checkpoint
from tests.conftest import ROPE, ffn_only, full, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00002.safetensors"
ALL = ("convert", "fuse", "generate", "analyze", "verify")  # the commands that read a source checkpoint's weights
WITH_TOKENIZER = ("convert", "fuse", "generate", "analyze")  # ...and its tokenizer (verify compares logits only)
COPYING = ("convert", "fuse")  # the commands that copy its tokenizer / side files


def tiny_spec() -> ModelSpec:
    """Four small layers; layers 1-2 are an attention-free run, so `fuse` has something to fuse."""
    layers = (full(2, 256), ffn_only(256), ffn_only(256), full(2, 256))
    return ModelSpec(hidden=32, heads=4, head_dim=8, vocab=16, layers=layers, rope_scaling=ROPE,
                     max_position_embeddings=64, passthrough={"bos_token_id": 1, "eos_token_id": 2})


@dataclass(frozen=True)
class Case:
    name: str
    corrupt: Callable[[Path], None]  # applied to a fresh copy of the tiny checkpoint
    expect: str  # in the one error line; {shard} / {tensor} are filled in
    commands: tuple[str, ...] = ALL


# ---- corruptions ------------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


def write_raw(path: Path, header: bytes, data: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def edit_header(fn: Callable[[dict], object], shard: str = SHARD) -> Callable[[Path], None]:
    """A corruption that edits one shard's JSON header in place with `fn(header)` (data bytes unchanged)."""
    def corrupt(ckpt: Path) -> None:
        blob, data = read_raw(ckpt / shard)
        header = json.loads(blob)
        fn(header)
        write_raw(ckpt / shard, json.dumps(header).encode(), data)
    return corrupt


def edit_entry(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the first tensor's entry of the first shard in place."""
    return edit_header(lambda h: fn(h[first_tensor(h)]))


def same_size_pair(header: dict) -> tuple[str, str]:
    by_size: dict[int, list[str]] = {}
    for k, v in header.items():
        if k != "__metadata__":
            b, e = v["data_offsets"]
            by_size.setdefault(e - b, []).append(k)
    pair = next(sorted(v, key=lambda k: header[k]["data_offsets"]) for v in by_size.values() if len(v) > 1)
    return pair[0], pair[1]


def overlap(header: dict) -> None:
    """The later of two same-size tensors is given the earlier one's bytes."""
    a, b = same_size_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def negative(entry: dict) -> None:
    b, e = entry["data_offsets"]
    entry["data_offsets"] = [b - e - 4, -4]


def set_field(key: str, value: object) -> Callable[[dict], None]:
    def fn(entry: dict) -> None:
        entry[key] = value
    return fn


def drop_field(key: str) -> Callable[[dict], None]:
    return lambda entry: entry.pop(key)


def reverse_offsets(entry: dict) -> None:
    entry["data_offsets"] = entry["data_offsets"][::-1]


def three_offsets(entry: dict) -> None:
    entry["data_offsets"] = [*entry["data_offsets"], entry["data_offsets"][1]]


def wrong_shape(entry: dict) -> None:
    entry["shape"] = [*entry["shape"], 2]


def replace_raw(header: bytes | None = None, length: int | None = None) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        blob, data = read_raw(ckpt / SHARD)
        if header is not None:
            write_raw(ckpt / SHARD, header, data)
        else:
            (ckpt / SHARD).write_bytes(struct.pack("<Q", length) + blob + data)
    return corrupt


def truncate(ckpt: Path) -> None:
    os.truncate(ckpt / SHARD, (ckpt / SHARD).stat().st_size - 8)


def trailing(ckpt: Path) -> None:
    with open(ckpt / SHARD, "ab") as f:
        f.write(b"\0" * 16)


def fp8_tensor(ckpt: Path) -> None:
    """A valid FP8 tensor where the config wants bf16: refused by the spec check, not a crash."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / SHARD)
    name = min(tensors, key=lambda k: tensors[k].numel())
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, ckpt / SHARD)


def edit_index(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit the index in place with `fn(index)`."""
    def corrupt(ckpt: Path) -> None:
        index = json.loads((ckpt / INDEX).read_text())
        fn(index)
        (ckpt / INDEX).write_text(json.dumps(index))
    return corrupt


def index_text(text: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / INDEX).write_text(text)


def move_shard_out(rel: str) -> Callable[[Path], None]:
    """Move the first shard to `ckpt/rel` (outside the checkpoint) and point the index at it."""
    def corrupt(ckpt: Path) -> None:
        dst = (ckpt / rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        (ckpt / SHARD).rename(dst)
        edit_index(lambda i: i.update(weight_map={k: rel if v == SHARD else v
                                                  for k, v in i["weight_map"].items()}))(ckpt)
    return corrupt


def link_out(name: str) -> Callable[[Path], None]:
    """Replace `name` with a symlink to an identical copy outside the checkpoint."""
    def corrupt(ckpt: Path) -> None:
        outside = ckpt.parent / "elsewhere" / name
        outside.parent.mkdir(exist_ok=True)
        (ckpt / name).rename(outside)
        (ckpt / name).symlink_to(outside)
    return corrupt


def link_dir_out(ckpt: Path) -> None:
    outside = ckpt.parent / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    (ckpt / "extras").symlink_to(outside, target_is_directory=True)


def link_loop(ckpt: Path) -> None:
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "loop").symlink_to("..", target_is_directory=True)


def file_loop(ckpt: Path) -> None:
    (ckpt / "notes.md").symlink_to("notes.md")


def tokenizer_text(text: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / "tokenizer.json").write_text(text)


CASES = [
    # one safetensors header validator (the library's rules)
    Case("overlapping offsets", edit_header(overlap), f"{SHARD}: tensor"),
    Case("negative offsets", edit_entry(negative), "{shard}: tensor {tensor}: data_offsets"),
    Case("metadata not strings", edit_header(lambda h: h.update({"__metadata__": {"format": 1}})),
         f"{SHARD}: __metadata__['format'] is integer 1"),
    Case("metadata a list", edit_header(lambda h: h.update({"__metadata__": ["pt"]})), "__metadata__ is a JSON list"),
    Case("header a list", replace_raw(header=b'["model.norm.weight"]'), f"{SHARD}: header is a JSON list"),
    Case("header null", replace_raw(header=b"null"), f"{SHARD}: header is a JSON null"),
    Case("header not JSON", replace_raw(header=b"{not json"), f"{SHARD}: header is not valid JSON"),
    Case("header not UTF-8", replace_raw(header=b'{"\xff": 1}'), f"{SHARD}: header is not valid JSON"),
    Case("header nested too deeply", replace_raw(header=b"[" * 100_000 + b"]" * 100_000),
         f"{SHARD}: header is nested too deeply"),
    Case("header length absurd", replace_raw(length=1 << 40), f"{SHARD}: file is truncated or not safetensors"),
    Case("entry a string", edit_header(lambda h: h.update({first_tensor(h): "F32"})),
         "{shard}: tensor {tensor}: entry is a JSON string"),
    Case("missing data_offsets", edit_entry(drop_field("data_offsets")), "{tensor}: entry has no data_offsets"),
    Case("missing shape", edit_entry(drop_field("shape")), "{tensor}: entry has no shape"),
    Case("dtype a list", edit_entry(set_field("dtype", ["F32"])), "{tensor}: unsupported dtype ['F32']"),
    Case("dtype unknown", edit_entry(set_field("dtype", "F31")), "{tensor}: unsupported dtype 'F31'"),
    Case("offsets a string", edit_entry(set_field("data_offsets", "0,4")), "{tensor}: data_offsets is string"),
    Case("three offsets", edit_entry(three_offsets), "{tensor}: data_offsets"),
    Case("reversed offsets", edit_entry(reverse_offsets), "{tensor}: data_offsets"),
    Case("bool in shape", edit_entry(set_field("shape", [True])), "{tensor}: shape [True] holds True"),
    Case("float in shape", edit_entry(set_field("shape", [32.0])), "{tensor}: shape [32.0] holds 32.0"),
    Case("shape vs bytes", edit_entry(wrong_shape), "{tensor}: data_offsets"),
    Case("truncated", truncate, "(file is truncated)"),
    Case("trailing bytes", trailing, f"{SHARD}: 16 bytes after the last tensor's data"),
    Case("fp8 tensor in a bf16 model", fp8_tensor,
         "tensor model.layers.0.input_layernorm.weight: dtype float8_e4m3fn, expected"),
    # index files
    Case("index not JSON", index_text("{oops"), f"{INDEX}: not valid JSON"),
    Case("index a list", index_text("[]"), f"{INDEX}: is a JSON list"),
    Case("weight_map a list", edit_index(lambda i: i.update(weight_map=[])), f"{INDEX}: weight_map is a JSON list"),
    Case("weight_map missing", edit_index(lambda i: i.pop("weight_map")), f"{INDEX}: weight_map is missing"),
    Case("weight_map value not a file", edit_index(lambda i: i["weight_map"].update({"x": 3})),
         f"{INDEX}: weight_map['x'] is 3"),
    # paths stay inside the checkpoint
    Case("index names ../", move_shard_out("../../elsewhere/model.safetensors"),
         "'../../elsewhere/model.safetensors' points outside the checkpoint"),
    Case("index names an absolute path", edit_index(lambda i: i.update(weight_map={
        k: "/etc/hostname" if v == SHARD else v for k, v in i["weight_map"].items()})),
         "'/etc/hostname' points outside"),
    Case("shard linked outside", link_out(SHARD), f"{SHARD} is a symlink to"),
    Case("config linked outside", link_out("config.json"), "config.json is a symlink to"),
    Case("tokenizer linked outside", link_out("tokenizer.json"), "tokenizer.json is a symlink to", COPYING),
    Case("directory linked outside", link_dir_out, "extras is a symlink to", COPYING),
    Case("symlink loop in a subdirectory", link_loop, "sub/loop is a symlink to a directory", ("fuse",)),
    Case("file symlink loop", file_loop, "notes.md is a symlink that cannot be resolved", COPYING),
    # the tokenizer is checked where it is copied
    Case("tokenizer not JSON", tokenizer_text("{bad"), "tokenizer.json: not valid JSON", WITH_TOKENIZER),
    Case("tokenizer not a tokenizer", tokenizer_text('{"model": 3}'),
         "tokenizer.json: the tokenizers library cannot load it", WITH_TOKENIZER),
]


def edit_config(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        fn(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return corrupt


def config_field(key: str, value: object) -> Callable[[Path], None]:
    return edit_config(lambda c: c.update({key: value}))


WITH_INSPECT = (*ALL, "inspect")
# one config validator (ModelSpec parsing): every field typed strictly, named in the one error line
CASES += [
    Case("config not UTF-8", lambda c: (c / "config.json").write_bytes(b'{"hidden_size": "\xff"}'),
         "config.json: not UTF-8", WITH_INSPECT),
    Case("config a JSON list", lambda c: (c / "config.json").write_text("[1]"), "config.json: must hold a JSON object",
         WITH_INSPECT),
    Case("block attention an int", edit_config(lambda c: c["block_configs"][1].update(attention=3)),
         "layer 1: field 'attention' = 3: must be an object", WITH_INSPECT),
    *[Case(f"config {key} = {value!r}", config_field(key, value), f"field '{key}' = {value!r}", WITH_INSPECT)
      for key, value in [("hidden_size", -32), ("num_attention_heads", 0), ("vocab_size", 0), ("head_dim", "8"),
                         ("num_hidden_layers", "4"), ("rope_theta", -1), ("rope_theta", "1e4"),
                         ("rms_norm_eps", -1), ("max_position_embeddings", -1), ("tie_word_embeddings", "false"),
                         ("rope_scaling", "llama3"), ("attention_bias", True)]],
]


# ---- the harness ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The valid tiny checkpoint every case starts from (two shards + index, tokenizer)."""
    torch.set_num_threads(1)
    path = write_random_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", tiny_spec(), seed=5,
                                   max_shard_bytes=150_000)
    write_tokenizer(path)
    assert sorted(p.name for p in path.glob("*.safetensors"))[0] == SHARD and (path / INDEX).is_file()
    assert len(list(path.glob("*.safetensors"))) == 2
    return path


@pytest.fixture(scope="module")
def engine(base, tmp_path_factory) -> Path:
    """A valid engine converted from `base`: `verify` checks each corrupted source against it."""
    out = tmp_path_factory.mktemp("engine") / "e"
    assert main(["convert", str(base), "--tp", "1", "--out", str(out), "--no-progress"]) == 0
    return out


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under the case directory, links as their targets (not followed)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def argv(command: str, ckpt: Path, out: Path, engine: Path | None = None) -> list[str]:
    if command == "convert":
        return ["convert", str(ckpt), "--tp", "1", "--out", str(out), "--no-progress"]
    if command == "fuse":
        plan = ckpt.parent / "plan.json"  # beside the checkpoint, not in it
        plan.write_text(json.dumps({"groups": [[1, 2]]}))
        return ["fuse", str(ckpt), "--plan", str(plan), "--out", str(out)]
    if command == "generate":
        return ["generate", str(ckpt), "a b", "--max-tokens", "1"]
    if command == "inspect":
        return ["inspect", str(ckpt), "--tp", "2"]
    if command == "analyze":
        text = ckpt.parent / "calib.txt"
        text.write_text("a b " * 200)
        return ["analyze", str(ckpt), "--calib", str(text), "--tokens", "64", "--seq-len", "16", "--out", str(out)]
    if command == "verify":  # a valid engine, checked against the corrupted source
        return ["verify", str(engine), "--against", str(ckpt)]
    raise AssertionError(command)


def prepared(case: Case, base: Path, root: Path) -> tuple[Path, str]:
    """A fresh corrupted copy under `root`, and the case's expected text with names filled in."""
    ckpt = root / "ckpt"
    shutil.copytree(base, ckpt, symlinks=True)
    header = json.loads(read_raw(base / SHARD)[0])
    case.corrupt(ckpt)
    return ckpt, case.expect.format(shard=SHARD, tensor=first_tensor(header))


def check_refused(rc: int, err: str, expect: str, root: Path, before: dict, out: Path) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert snapshot(root) == before, "the source changed"


PAIRS = [pytest.param(c, cmd, id=f"{c.name}-{cmd}") for c in CASES for cmd in c.commands]


@pytest.mark.parametrize(("case", "command"), PAIRS)
def test_refused(case, command, base, engine, tmp_path, capsys):
    ckpt, expect = prepared(case, base, tmp_path / "case")
    out = tmp_path / "out" / "result"
    (tmp_path / "out").mkdir()
    args = argv(command, ckpt, out, engine)
    before = snapshot(tmp_path / "case")
    capsys.readouterr()
    rc = main(args)
    check_refused(rc, capsys.readouterr().err, expect, tmp_path / "case", before, out)


SUBPROCESS_ROWS = ("overlapping offsets", "header a list", "index names ../", "tokenizer not JSON",
                   "config a JSON list")


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _subprocess_check(case: Case, command: str, base: Path, engine: Path, tmp_path: Path) -> None:
    ckpt, expect = prepared(case, base, tmp_path / "case")
    out = tmp_path / "out" / "result"
    (tmp_path / "out").mkdir()
    args = argv(command, ckpt, out, engine)
    before = snapshot(tmp_path / "case")
    r = run_cli(args)
    check_refused(r.returncode, r.stderr, expect, tmp_path / "case", before, out)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "command"), [p for p in PAIRS if p.values[0].name in SUBPROCESS_ROWS
                                                and p.values[1] == "convert"]
                         + [p for p in PAIRS if p.values[0].name == "header a list" and p.values[1] == "fuse"])
def test_real_cli_in_subprocess(case, command, base, engine, tmp_path):
    _subprocess_check(case, command, base, engine, tmp_path)


# ---- what must keep working ---------------------------------------------------------------------
def hub_cache(base: Path, root: Path) -> Path:
    """`models--org--tiny/snapshots/<rev>/` whose files are links to `../../blobs/<hash>`, as the hub lays out."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(base.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy2(p, blob)
        (snap / p.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snap


@pytest.mark.parametrize("command", COPYING)
def test_hub_cache_layout_works_by_default(command, base, tmp_path, capsys):
    snap = hub_cache(base, tmp_path)
    out = tmp_path / "out"
    assert main(argv(command, snap, out)) == 0, capsys.readouterr().err
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer" / "tokenizer.json").is_file()
    assert not any(p.is_symlink() for p in out.rglob("*"))  # contents copied, never links


def test_follow_symlinks_opts_in(base, tmp_path, capsys):
    ckpt, _ = prepared(Case("linked", link_out(SHARD), ""), base, tmp_path)
    out = tmp_path / "out"
    assert main(argv("convert", ckpt, out)) == 2
    assert "pass --follow-symlinks" in capsys.readouterr().err
    assert main([*argv("convert", ckpt, out), "--follow-symlinks"]) == 0, capsys.readouterr().err
    assert (out / "checkpoint" / "rank0.safetensors").is_file()


def test_real_subdirectory_is_copied_by_fuse(base, tmp_path, capsys):
    ckpt, _ = prepared(Case("subdir", lambda p: None, ""), base, tmp_path)
    (ckpt / "docs").mkdir()
    (ckpt / "docs" / "card.md").write_text("# tiny")
    out = tmp_path / "out"
    assert main(argv("fuse", ckpt, out)) == 0, capsys.readouterr().err
    assert (out / "docs" / "card.md").read_text() == "# tiny"


def test_package_refuses_a_broken_tokenizer(base, tmp_path, capsys):
    """An engine directory whose copied tokenizer.json was damaged afterwards: `package` says so."""
    engine = tmp_path / "engine"
    assert main(argv("convert", base, engine)) == 0, capsys.readouterr().err
    (engine / "tokenizer" / "tokenizer.json").write_text('{"model": 3}')
    before = snapshot(engine)
    capsys.readouterr()
    rc = main(["package", str(engine), "--out", str(tmp_path / "repo")])
    check_refused(rc, capsys.readouterr().err, "tokenizer/tokenizer.json: the tokenizers library cannot load it",
                  engine, before, tmp_path / "repo")

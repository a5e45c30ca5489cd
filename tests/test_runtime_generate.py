"""`python -m export generate` end to end: a tiny checkpoint with a trained byte-level BPE tokenizer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.cli import main
from export.io.tokenizer import load_tokenizer
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["the quick brown fox jumps over the lazy dog", "a tiny model for a tiny test",
          "tensor parallel workers agree with one process", "hello world, hello runtime"] * 20


def _train_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    vocab = _train_tokenizer(root / "tok")
    spec = dataclasses.replace(hetero_spec(), vocab=vocab)
    path = write_random_checkpoint(root / "ckpt", spec, seed=5, std=0.1)
    for f in (root / "tok").iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.mark.slow
def test_generate_tp2_prints_text_and_speed(ckpt):
    tok = load_tokenizer(ckpt)
    with Engine.start(ckpt) as eng:  # what tp = 1 makes of it, in-process
        want = eng.generate([tok.encode("hello world")], SamplingParams(max_tokens=8))[0]
    run = subprocess.run([sys.executable, "-m", "export", "generate", str(ckpt), "hello world", "--tp", "2",
                          "--max-tokens", "8", "--ignore-eos", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert res["tp"] == 2 and res["new_tokens"] == want
    assert res["text"] == tok.decode(want, skip_special_tokens=True) and res["text"]
    assert res["tokens_per_s"] > 0
    plain = subprocess.run([sys.executable, "-m", "export", "generate", str(ckpt), "hello", "--max-tokens", "4",
                            "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3"],
                           cwd=REPO, capture_output=True, text=True, timeout=240)
    assert plain.returncode == 0, plain.stderr
    assert "tokens/s" in plain.stderr and plain.stdout.strip()


def test_generate_without_tokenizer_is_a_clear_error(tmp_path, capsys):
    path = write_random_checkpoint(tmp_path / "bare", hetero_spec(), seed=6)
    assert main(["generate", str(path), "hi"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_streams_after_echoing_the_prompt_and_reads_stdin(ckpt):
    """What is printed is the prompt, then exactly the generated text (streamed piece by piece)."""
    tok = load_tokenizer(ckpt)
    with Engine.start(ckpt) as eng:
        want = tok.decode(eng.generate([tok.encode("hello world")], SamplingParams(max_tokens=6))[0],
                          skip_special_tokens=True)
    args = [sys.executable, "-m", "export", "generate", str(ckpt), "-", "--max-tokens", "6", "--ignore-eos"]
    run = subprocess.run(args, cwd=REPO, input="hello world", capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello world" + want + "\n"
    quiet = subprocess.run([*args, "--no-echo"], cwd=REPO, input="hello world", capture_output=True, text=True,
                           timeout=240)
    assert quiet.stdout == want + "\n"

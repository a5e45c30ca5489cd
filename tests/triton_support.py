"""Fixtures for the Triton tests: a tiny byte-level BPE tokenizer, a matching random model,
and an engines/NAME directory around them (manifest + checkpoint + tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from export.spec import FFN, Attention, AttentionKind, FFNKind, Layer, ModelSpec

CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld, ça va? naïve café",
          "数据 模型 推理 服务 中文 文本", "emoji 🙂 🚀 ✨ and more", "Triton serves tensor parallel models",
          "streaming text keeps spaces and multi byte characters"] * 4
SPECIALS = ["<unk>", "<s>", "</s>"]


def write_tokenizer(path: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE (so multi-byte characters span tokens); returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 256, "clean_up_tokenization_spaces": False}))
    return tok.get_vocab_size()


def tiny_spec(vocab: int, tp_kv: int = 2) -> ModelSpec:
    full = Layer(Attention(AttentionKind.FULL, tp_kv), FFN(FFNKind.SWIGLU, 256))
    ffn_only = Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.SWIGLU, 512))
    return ModelSpec(hidden=64, heads=4, head_dim=16, vocab=vocab, layers=(full, ffn_only, ffn_only, full),
                     dtype="float32", max_position_embeddings=256,
                     passthrough={"bos_token_id": 1, "eos_token_id": 2})


def make_engine_dir(root: Path, tp: int = 2, seed: int = 0) -> Path:
    """tokenizer + matching random DeciLM checkpoint -> `convert` at `tp` -> root/engines/tiny."""
    from export.synthetic import write_random_checkpoint
    from export.trtllm.convert import convert

    src = root / "hf"
    tok_dir = root / "tok"
    vocab = write_tokenizer(tok_dir)
    write_random_checkpoint(src, tiny_spec(vocab), seed=seed, std=0.2)
    for f in tok_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    out = root / "engines" / "tiny"
    convert(src, out, tp=tp, progress=False)
    return out


FP8 = ("FP8", "FP8", ("lm_head",))  # Quantization(algo, kv_cache, exclude): ModelOpt's recipe + FP8 KV cache


def make_fp8_engine_dir(root: Path, tp: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """An FP8 engines/NAME and the HF FP8 source it holds: a ModelOpt-format FP8 checkpoint of the
    tiny model (random weights quantized at amax / 448, random input and KV scales) with the
    tokenizer, then engines/tiny-fp8 = that checkpoint as checkpoint/ (the torch runtime reads HF
    FP8 and slices it at the manifest's tp), tokenizer/, and a manifest recording FP8.

    Assumed: `convert` of an FP8 source to TRT-LLM FP8 rank files (branch fp8-convert) has not
    landed, so the engine directory holds the HF FP8 checkpoint where convert would put rank files;
    the cpu flavour serves either through the same source registry."""
    import shutil

    from export.engine_dir import EngineDir
    from export.manifest import Manifest, tree_sha256
    from export.quantization import Quantization
    from export.synthetic import write_random_checkpoint
    from export.trtllm.convert import default_build

    src, tok_dir, out = root / "hf-fp8", root / "tok", root / "engines" / "tiny-fp8"
    vocab = write_tokenizer(tok_dir)
    spec = tiny_spec(vocab).with_quant(Quantization(*FP8))
    write_random_checkpoint(src, spec, seed=seed, std=0.2)
    for f in tok_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    out.mkdir(parents=True)
    shutil.copytree(src, out / "checkpoint")
    shutil.copytree(tok_dir, out / "tokenizer")
    Manifest(source_path=str(src.resolve()), source_sha256=tree_sha256(src), tp=tp, pp=1, dtype=spec.dtype,
             engines={"cpu": {"path": "checkpoint", "verified": False}}, build=default_build(spec),
             quantization=EngineDir.quantization_record(spec.quant)).save(out)
    return out, src


def stop_serve(serve, timeout: float = 60) -> int:
    """Ctrl-C a `python -m export serve` subprocess and wait for it. If it does not stop, kill it (its
    reaper then stops the server) so a failing test leaves no server behind, and fail."""
    import signal
    import subprocess

    serve.send_signal(signal.SIGINT)
    try:
        return serve.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        serve.kill()
        serve.wait()
        raise

"""Calibration / held-out text as token batches, and a model loaded whole for analysis (tp = 1).

Text comes from a file or a directory of `*.txt` / `*.md` files, tokenized with the checkpoint's
own `tokenizer.json` (`export.io.tokenizer`, kind "tokenizers") and cut into equal-length
sequences, so every metric averages over the same number of tokens for every model compared.
"""

from __future__ import annotations

from pathlib import Path

import torch

from export.errors import ExportError
from export.mapping import Mapping
from export.spec import ModelSpec

TEXT_SUFFIXES = (".txt", ".md", ".text", ".py")


def text_files(path: str | Path) -> list[Path]:
    """A file, or every text/source file under a directory in sorted path order."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ExportError(f"{p}: no {'/'.join(TEXT_SUFFIXES)} files in this directory")
        return files
    if not p.is_file():
        raise ExportError(f"{p}: text file or directory does not exist")
    return [p]


def token_ids(path: str | Path, tokenizer, limit: int) -> list[int]:
    """Tokens of the text at `path`, reading files only until `limit` tokens are in hand."""
    ids: list[int] = []
    for f in text_files(path):
        ids += tokenizer.encode(f.read_text(errors="replace")).ids
        if len(ids) >= limit:
            break
    return ids


def token_batch(path: str | Path, tokenizer, vocab: int, tokens: int, seq_len: int) -> torch.Tensor:
    """[N, seq_len] token ids, N = tokens // seq_len sequences cut from the start of the text."""
    ids = token_ids(path, tokenizer, tokens)
    n = min(tokens, len(ids)) // seq_len
    if n == 0:
        raise ExportError(f"the text has {len(ids)} tokens; need at least one sequence of {seq_len}")
    bad = [t for t in ids[:n * seq_len] if not 0 <= t < vocab]
    if bad:
        raise ExportError(f"tokenizer gives id {bad[0]}, outside the model's vocab of {vocab}")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(spec, Decoder) for the whole model in this process; HF or exported TRT-LLM checkpoint."""
    from export.runtime.model import load_decoder
    from export.sources import open_source

    spec, _, weights = open_source(Path(path))
    return spec, load_decoder(weights(Mapping(), 0), dtype=dtype)


def non_empty_layers(spec: ModelSpec) -> int:
    return spec.num_layers - len(spec.empty_layers())


def fused_input_amax(path: str | Path, groups: list, text: str | Path, *, fold: bool = True, tokens: int = 2048,
                     seq_len: int = 128, batch: int = 8, tokenizer: str | Path | None = None) -> dict[int, float]:
    """For each fusion group (`plan.Group`), the amax over `text` of its fused gate/up input, keyed
    by its first FFN layer: rmsnorm(x) times the fused norm (ones under `fold`, else the last
    member's), x the residual entering the group. Measured on the source model (`fuse --calib`):
    the first member's gate/up input is rmsnorm(x) * s_first, so dividing by s_first gives the
    fused block's input exactly (channels where s_first is 0 carry no information and count 0)."""
    import torch

    from export.io.tokenizer import load_tokenizer
    from export.tensors import Role

    spec, dec = load_model(path)
    firsts = {g.ffn_layers[0]: g for g in groups}
    scales = {i: dec.w(Role.FFN_NORM, i).float() for i in firsts}
    fused_norms = {i: (None if fold else dec.w(Role.FFN_NORM, g.ffn_layers[-1]).float()) for i, g in firsts.items()}
    amax: dict[int, float] = dict.fromkeys(firsts, 0.0)

    def observe(key: object, x: torch.Tensor) -> None:
        if isinstance(key, tuple) and len(key) == 2 and key[0] is Role.UP and key[1] in firsts:
            i = key[1]
            s = scales[i]
            u = torch.where(s != 0, x.float() / torch.where(s != 0, s, 1.0), 0.0)
            if fused_norms[i] is not None:
                u = u * fused_norms[i]
            amax[i] = max(amax[i], float(u.abs().max()))
    dec.observe = observe
    ids = token_batch(text, load_tokenizer(path, tokenizer, kind="tokenizers"), spec.vocab, tokens, seq_len)
    with torch.inference_mode():
        for b in ids.split(batch):
            dec(b)
    return amax

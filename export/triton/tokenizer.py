"""The engine's tokenizer from tokenizer.json + tokenizer_config.json, via `tokenizers` only.

Inside Triton's python-backend stub (Python 3.11.2 over the host's 3.11.7 stdlib) `ssl` does not
import, and `transformers` pulls it in through huggingface_hub. The `tokenizers` library alone
gives the same ids and text as `AutoTokenizer` for a fast tokenizer (checked in the tests), with
no network and a fraction of the import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.errors import ExportError


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """encode/decode with the same signatures as an HF fast tokenizer (the parts we use)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as Fast

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ExportError(f"{path}: no tokenizer.json (a fast tokenizer file is required for serving)")
        self.fast = Fast.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.eos_token_id = self._id(self.eos_token, "eos_token", path)
        self.pad_token_id = self._id(self.pad_token, "pad_token", path)

    def _id(self, token: str | None, key: str, path: Path) -> int | None:
        if token is None:
            return None
        tid = self.fast.token_to_id(token)
        if tid is None:
            raise ExportError(f"{path}/tokenizer_config.json: {key} {token!r} is not in the vocabulary")
        return tid

    def __len__(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.fast.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=skip_special_tokens)

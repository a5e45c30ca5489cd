"""The one tokenizer loader: one search rule for where a model's tokenizer is, three ways to load it.

Where: an explicit `--tokenizer DIR` is the only place looked at; otherwise the model's directory
itself, its engine directory's tokenizer (`EngineDir.tokenizer`, for engines/NAME and
engines/NAME/checkpoint), then `DIR/tokenizer` and `DIR/../tokenizer`.

How (`kind`): "transformers" (`AutoTokenizer`, offline, for `generate` and the demo), "tokenizers"
(the raw `tokenizers.Tokenizer` of tokenizer.json, for the fusion studies), "serving"
(`FastTokenizer`: `tokenizers` only, for Triton's python-backend stub, where `transformers`
cannot be imported because `ssl` does not). A tokenizer.json is checked before it is parsed, so a
broken one is one clear line naming the file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

from export.engine_dir import EngineDir
from export.errors import ExportError
from export.io.tokenizer_file import TOKENIZER_JSON, check_tokenizer_json

Kind = Literal["transformers", "tokenizers", "serving"]
# Files that make a directory a tokenizer for each kind (a fast-only loader needs tokenizer.json).
NEEDS: dict[str, tuple[str, ...]] = {"transformers": ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
                                     "tokenizers": (TOKENIZER_JSON,), "serving": (TOKENIZER_JSON,)}


def tokenizer_places(model: str | Path) -> list[Path]:
    """Where the tokenizer of the model at `model` may be, in the order they are tried."""
    model = Path(model)
    engine = EngineDir.around(model)
    places = [model, *([engine.tokenizer] if engine is not None and engine.tokenizer else []),
              model / "tokenizer", model.parent / "tokenizer"]
    return list(dict.fromkeys(places))


def find_tokenizer_dir(model: str | Path | None, tokenizer: str | Path | None = None, *,
                       kind: Kind = "transformers") -> Path:
    """The first place (`tokenizer_places`, or only `tokenizer` when given) holding a `kind` tokenizer."""
    places = [Path(tokenizer)] if tokenizer else tokenizer_places(model)  # type: ignore[arg-type]
    for d in places:
        if any((d / f).is_file() for f in NEEDS[kind]):
            return d
    if kind == "serving":
        raise ExportError(f"{places[0]}: no tokenizer.json (a fast tokenizer file is required for serving)")
    what = "no tokenizer found" if kind == "transformers" else "no tokenizer.json found"
    raise ExportError(f"{model or tokenizer}: {what} (looked for {', '.join(NEEDS[kind])} in "
                      f"{', '.join(str(d) for d in places)}); pass --tokenizer DIR")


def load_tokenizer(model: str | Path | None, tokenizer: str | Path | None = None, *,
                   kind: Kind = "transformers") -> Any:
    """The model's tokenizer (or the one in `tokenizer`), loaded the `kind` way, offline."""
    d = find_tokenizer_dir(model, tokenizer, kind=kind)
    if (d / TOKENIZER_JSON).is_file():
        check_tokenizer_json(d / TOKENIZER_JSON)
    if kind == "serving":
        return FastTokenizer(d)
    if kind == "tokenizers":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(d / TOKENIZER_JSON))
    return _transformers_tokenizer(d)


def _transformers_tokenizer(d: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # it warns about DeciLM's model_type, which tokenizers do not need
    try:
        with warnings.catch_warnings():  # it reads config.json only to pick a class; a legacy
            # `rope_scaling` key there draws transformers 5's deprecation warning on every run
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            # never the checkpoint's remote code (a tokenizer needs none): with it left
            # unset, a config with auto_map makes transformers ask on stdin
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception:  # an unknown model_type etc.: the raw tokenizer.json still works
        if (d / TOKENIZER_JSON).is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(d / TOKENIZER_JSON))
        raise


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    """tokenizer.json + tokenizer_config.json via `tokenizers` only, with the encode/decode
    signatures of an HF fast tokenizer (the parts serving uses); the same ids and text as
    `AutoTokenizer` for a fast tokenizer (checked in the tests), at a fraction of the import time."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as Fast

        path = Path(path)
        if not (path / TOKENIZER_JSON).is_file():
            raise ExportError(f"{path}: no tokenizer.json (a fast tokenizer file is required for serving)")
        self.fast = Fast.from_file(str(path / TOKENIZER_JSON))
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

"""A tokenizer.json is checked where it is copied, not where it is first used.

convert, fuse and package only copy or point at the tokenizer; the first code to parse it used to
be Triton's preprocessing model at `serve` time, far from the cause. Loading it once with the
same library serving uses (`tokenizers`) moves that failure to the command that took it in.
"""

from __future__ import annotations

import json
from pathlib import Path

from export.errors import CheckpointError

TOKENIZER_JSON = "tokenizer.json"


def check_tokenizer_json(path: Path) -> None:
    """CheckpointError (one line, naming the file) unless `tokenizers` can load `path`."""
    try:
        json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"not valid JSON ({_one_line(e)})", path) from None
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror})", path) from None
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"the tokenizers library cannot load it ({_one_line(e)})", path) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())

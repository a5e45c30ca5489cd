"""Incremental detokenization: streamed text that keeps spaces and multi-byte characters.

Decoding tokens one at a time loses SentencePiece leading spaces and splits UTF-8 characters
that span several byte-level tokens. Instead decode the accumulated ids, emit only the new
suffix, and hold back a trailing U+FFFD (an incomplete UTF-8 sequence) until a later token
completes it or the stream ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def stable_text(tokenizer: Any, ids: Sequence[int], final: bool, skip_special_tokens: bool = True) -> str:
    """The text of `ids` that no later token can change (all of it when `final`)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=False)
    return text if final else text.rstrip(REPLACEMENT)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def text_delta(tokenizer: Any, ids: Sequence[int], n_prev: int, final: bool,
               skip_special_tokens: bool = True) -> str:
    """Stateless: the text to emit when `ids[n_prev:]` arrive after `ids[:n_prev]` were streamed."""
    before = stable_text(tokenizer, ids[:n_prev], False, skip_special_tokens) if n_prev else ""
    after = stable_text(tokenizer, ids, final, skip_special_tokens)
    return after[len(before):] if after.startswith(before) else after[_common_prefix(before, after):]


class IncrementalDecoder:
    """Stateful form for a request loop (BLS, clients): push new ids, get the new text."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(int(i) for i in new_ids)
        text = stable_text(self.tokenizer, self.ids, final, self.skip)
        start = len(self.emitted) if text.startswith(self.emitted) else _common_prefix(self.emitted, text)
        delta = text[start:]
        self.emitted = text
        return delta

    def finish(self) -> str:
        """Flush what was held back (a genuinely invalid tail is emitted as U+FFFD)."""
        return self.push([], final=True)

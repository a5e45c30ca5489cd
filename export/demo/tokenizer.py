"""A byte-level BPE tokenizer for Python source, saved so `AutoTokenizer` loads it offline.

Byte-level BPE maps every byte to a symbol, so any text (indentation, tabs, non-ASCII) encodes
and decodes back exactly; `clean_up_tokenization_spaces=False` keeps transformers from "tidying"
spaces around punctuation on decode, which would break Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, model_max_length=max_length)
    fast.save_pretrained(str(directory))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (Path(directory) / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")

"""A byte-level BPE tokenizer for Python source, saved so `AutoTokenizer` loads it offline.

Byte-level BPE maps every byte to a symbol, so any text (indentation, tabs, non-ASCII) encodes
and decodes back exactly; `clean_up_tokenization_spaces=False` keeps transformers from "tidying"
spaces around punctuation on decode, which would break Python.

The chat template has the released Nemotron (Llama-3.1-Nemotron-Ultra) template's structure, with
text markers instead of Llama-3's header tokens (this vocabulary has none): BOS, a system turn
that is always written (empty unless the conversation starts with one; "detailed thinking on|off"
goes there), each turn on its own line, an assistant's reasoning up to `</think>` dropped from its
history, then the generation prompt. The markers are Python comments, the text this model knows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_CONFIG = "tokenizer_config.json"

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '# system:' + (' ' + system_message if system_message else '') + '\\n' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and '</think>' in message['content'] %}"
    "{%- set content = message['content'].split('</think>')[-1] %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{{- '# ' + message['role'] + ': ' + content | trim + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '# assistant:\\n' }}{%- endif %}"
)


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
    write_chat_template(Path(directory))


def write_chat_template(directory: Path) -> None:
    """`CHAT_TEMPLATE` as tokenizer_config.json's `chat_template`, which every transformers since 4.34
    reads (transformers 5 would write chat_template.jinja, which 4.45, our floor, does not read).
    Also run on the shipped tokenizers, which it changes only by that key."""
    path = Path(directory) / TOKENIZER_CONFIG
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

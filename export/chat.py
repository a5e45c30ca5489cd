"""Chat prompts: a conversation rendered with the checkpoint's own chat template, into the text a model is sent.

Nemotron checkpoints are queried through their chat template (Llama-3.1-Nemotron-Ultra switches
reasoning with the system prompt "detailed thinking on|off"). Every serving contract here takes
text (the ensemble's and BLS's `text_input`, the LLM-API model's `text_input`), so `query --chat`
and `generate --chat` render the conversation on the client with the tokenizer's
`apply_chat_template`, as trtllm-serve's /v1/chat/completions does on the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.errors import ExportError

PREPROCESSING_CONFIG = Path("preprocessing", "config.pbtxt")  # ensemble/BLS repositories (cpu, onnx, trtllm)


def chat_messages(user: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation: an optional system turn, then the user's. Without one the template's
    default system turn applies (the released Nemotron templates always write one)."""
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": user}]


def repository_tokenizer(path: Path) -> Path | None:
    """The tokenizer directory a model repository written by `package` serves with, or None when
    `path` is not one: preprocessing's `tokenizer_dir` (relative to the repository, as the python
    stub resolves it), or the LLM-API layout's model.yaml `model` (the HF checkpoint it loads)."""
    from export.triton import llmapi

    path = Path(path)
    if (path / PREPROCESSING_CONFIG).is_file():
        from export.triton.render import parse_model_config

        where = path / PREPROCESSING_CONFIG
        params = parse_model_config(where.read_text(), str(where)).parameters
        value = params["tokenizer_dir"].string_value if "tokenizer_dir" in params else ""
        if not value:
            raise ExportError(f"{where}: no tokenizer_dir parameter")
        return path / value  # an absolute value stays as it is
    model_yaml = path / llmapi.MODEL / "1" / llmapi.YAML_FILE
    if model_yaml.is_file():
        import yaml

        model = (yaml.safe_load(model_yaml.read_text()) or {}).get("model")
        if not model:
            raise ExportError(f"{model_yaml}: no `model` key (the HF checkpoint)")
        return Path(model)
    return None


def load_chat_tokenizer(path: Path, tokenizer: Path | None = None) -> Any:
    """The tokenizer of a model repository, engines/NAME, checkpoint or tokenizer directory
    (`tokenizer` overrides), through the runtime's one loader."""
    from export.io.tokenizer import load_tokenizer

    return load_tokenizer(Path(path), tokenizer or repository_tokenizer(Path(path)))


def render_chat(tok: Any, user: str, system: str | None = None) -> str:
    """`apply_chat_template(..., add_generation_prompt=True, tokenize=False)`: the prompt text.

    A template that writes BOS itself (Llama-3's `{{ bos_token }}`) would get a second one from a
    tokenizer that also adds BOS on encode, as the server's does; such a text drops its own."""
    if not getattr(tok, "chat_template", None):
        where = getattr(tok, "name_or_path", "") or "the tokenizer"
        raise ExportError(f"{where}: the tokenizer has no chat template (tokenizer_config.json `chat_template` "
                          f"or chat_template.jinja); send a plain prompt instead of --chat")
    text = tok.apply_chat_template(chat_messages(user, system), add_generation_prompt=True, tokenize=False)
    bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
    if bos and bos_id is not None and text.startswith(bos) and tok.encode("")[:1] == [bos_id]:
        text = text[len(bos):]
    return text


def chat_prompt(path: Path, user: str, system: str | None = None, tokenizer: Path | None = None) -> str:
    """The rendered prompt for `user` (and `system`) with the tokenizer found at `path`."""
    return render_chat(load_chat_tokenizer(path, tokenizer), user, system)


def prompt_or_chat(prompt: str | None, chat: str | None, system: str | None, source: Path | None,
                   tokenizer: Path | None = None) -> str:
    """What `query` / `generate` send: the positional prompt as it is, or the `--chat` turn (and
    `--system`) rendered with the tokenizer at `source` (`tokenizer` overrides)."""
    if chat is None:
        if system is not None:
            raise ExportError("--system goes with --chat (a plain prompt is sent as it is)")
        return prompt or ""
    if source is None:
        raise ExportError("--chat needs --tokenizer: the model repository, engines/NAME or tokenizer directory "
                          "whose chat template renders the conversation")
    return chat_prompt(source, chat, system, tokenizer)

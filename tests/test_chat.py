"""Chat prompts (`query --chat`, `generate --chat`): the checkpoint's chat template, applied by its tokenizer.

The demo tokenizers ship a small template of their own with the structure of the released Nemotron
one (BOS, an always-written system turn, the user turn, the assistant generation prompt).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from triton_support import make_engine_dir, stop_serve

from export.chat import chat_prompt, load_chat_tokenizer, prompt_or_chat, render_chat, repository_tokenizer
from export.demo.paths import DEMO_LLAMA, DEMO_PUZZLE
from export.demo.tokenizer import CHAT_TEMPLATE, save_tokenizer, train_tokenizer, write_chat_template
from export.errors import ExportError
from export.io.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "detailed thinking on"
USER = "Write a function that adds two numbers."
RENDERED = f"<|bos|># system: {SYSTEM}\n# user: {USER}\n# assistant:\n"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def with_template(tok_dir: Path) -> Path:
    """A tokenizer directory given the demo chat template (as a checkpoint's own would be)."""
    write_chat_template(tok_dir)
    return tok_dir


@pytest.mark.parametrize("directory", [DEMO_LLAMA, DEMO_PUZZLE], ids=["llama", "puzzle"])
def test_shipped_tokenizers_carry_what_the_builder_writes(directory, tmp_path):
    assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    copy = tmp_path / "tokenizer_config.json"
    shutil.copy(directory / "tokenizer_config.json", copy)
    write_chat_template(tmp_path)
    assert copy.read_bytes() == (directory / "tokenizer_config.json").read_bytes()


def test_the_demo_builder_saves_the_template(tmp_path):
    save_tokenizer(train_tokenizer(["def f(x):\n    return x\n"] * 8, vocab_size=300), tmp_path, 64)
    assert load_tokenizer(tmp_path).chat_template == CHAT_TEMPLATE


def test_rendered_prompt_is_the_tokenizers_apply_chat_template():
    tok = load_tokenizer(DEMO_PUZZLE)
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    want = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert chat_prompt(DEMO_PUZZLE, USER, SYSTEM) == want == RENDERED
    assert chat_prompt(DEMO_PUZZLE, USER) == f"<|bos|># system:\n# user: {USER}\n# assistant:\n"  # default system
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think> y"},
               {"role": "user", "content": "b"}]  # a reasoning trace is dropped from the history, as Nemotron's
    assert tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False) == \
        "<|bos|># system:\n# user: a\n# assistant: y\n# user: b\n# assistant:\n"
    assert tok.encode(RENDERED)[0] == tok.bos_token_id  # BOS as the special token, not its text


def test_a_template_bos_is_not_doubled_by_a_tokenizer_that_adds_one(tmp_path):
    from tokenizers import Tokenizer, processors
    from triton_support import write_tokenizer

    write_tokenizer(tmp_path)
    fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(with_template(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<s>")
    text = render_chat(tok, "hi")
    assert text == "# system:\n# user: hi\n# assistant:\n"
    assert tok.encode(text).count(tok.bos_token_id) == 1


@pytest.mark.slow
def test_a_tokenizer_without_a_template_is_one_line_exit_2(tmp_path):
    from triton_support import write_tokenizer

    write_tokenizer(tmp_path / "tok")
    with pytest.raises(ExportError, match="no chat template"):
        chat_prompt(tmp_path / "tok", USER)
    res = run("query", "--chat", USER, "--tokenizer", str(tmp_path / "tok"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "has no chat template" in res.stderr
    res = run("query", "a prompt", "--chat", USER)
    assert res.returncode == 2 and "not allowed with argument prompt" in res.stderr


def test_prompt_or_chat():
    assert prompt_or_chat("as it is", None, None, None) == "as it is"
    assert prompt_or_chat(None, USER, SYSTEM, DEMO_LLAMA) == RENDERED
    with pytest.raises(ExportError, match="--system goes with --chat"):
        prompt_or_chat("x", None, SYSTEM, DEMO_LLAMA)
    with pytest.raises(ExportError, match="--chat needs --tokenizer"):
        prompt_or_chat(None, USER, None, None)


@pytest.mark.slow
def test_generate_chat_equals_generate_of_the_rendered_prompt():
    from export.runtime.sampling import SamplingParams
    from export.runtime.text import generate_text

    chat = run("generate", str(DEMO_PUZZLE), "--chat", USER, "--system", SYSTEM, "--max-tokens", "12", "--json")
    assert chat.returncode == 0, chat.stderr
    plain = generate_text(DEMO_PUZZLE, RENDERED, SamplingParams(max_tokens=12))
    assert json.loads(chat.stdout)["new_tokens"] == plain.new_tokens
    assert json.loads(chat.stdout)["prompt_tokens"] == plain.prompt_tokens


def test_fuse_keeps_the_sources_chat_template(tmp_path):
    """Both forms: tokenizer_config.json's `chat_template` (the demo's) and transformers 5's chat_template.jinja."""
    from export.fusion.fuse import fuse_checkpoint
    from export.fusion.plan import FusionPlan

    fused = fuse_checkpoint(DEMO_PUZZLE, FusionPlan([(3, 6)]), tmp_path / "fused", progress=False).out
    assert chat_prompt(fused, USER, SYSTEM) == RENDERED
    src = tmp_path / "src"
    shutil.copytree(DEMO_PUZZLE, src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
                                             "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    fused = fuse_checkpoint(src, FusionPlan([(3, 6)]), tmp_path / "fused2", progress=False).out
    assert (fused / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    assert chat_prompt(fused, USER, SYSTEM) == chat_prompt(src, USER, SYSTEM) == \
        f"<|bos|>[system] {SYSTEM}\n[user] {USER}\n[assistant] "


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    """The tiny Triton engine (tp 1) whose tokenizer, and HF source, carry the demo chat template."""
    root = tmp_path_factory.mktemp("chat")
    engine_dir = make_engine_dir(root, tp=1)
    with_template(engine_dir / "tokenizer")
    with_template(root / "hf")
    return engine_dir


def test_repositories_name_the_tokenizer_they_serve_with(engine_dir, tmp_path):
    from export.triton.package import package_repo

    cpu = package_repo(engine_dir, tmp_path / "cpu", backend="cpu")
    assert repository_tokenizer(cpu) == cpu / "tensorrt_llm" / "engine" / "tokenizer"
    api = package_repo(engine_dir, tmp_path / "llmapi", backend="llmapi")
    assert repository_tokenizer(api) == (engine_dir.parent.parent / "hf").resolve()
    assert repository_tokenizer(engine_dir) is None
    want = render_chat(load_tokenizer(engine_dir), USER, SYSTEM)
    for where in (cpu, api, engine_dir):
        assert render_chat(load_chat_tokenizer(where), USER, SYSTEM) == want


@pytest.mark.slow
def test_query_chat_through_a_served_repository_equals_the_rendered_prompt(engine_dir, tmp_path):
    """As a user runs it: `package --backend llmapi` (tp 1), `serve`, `query --chat --stream` against the
    repository's tokenizer; the same text as `query` of the rendered prompt (the tp 2 CLI run and the
    ensemble/BLS contract are tests/test_llmapi.py's)."""

    from export.triton.client import Request, query
    from export.triton.server import free_port

    repo = tmp_path / "repo"
    res = run("package", str(engine_dir), "--out", str(repo), "--backend", "llmapi", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["llm_args"]["tensor_parallel_size"] == 1
    rendered = chat_prompt(repo, USER, SYSTEM)
    assert rendered == f"<s># system: {SYSTEM}\n# user: {USER}\n# assistant:\n"  # the repository's own tokenizer
    http, grpc, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "export", "serve", str(repo), "--http-port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = serve.stdout.readline()
        assert "tritonserver ready" in line, serve.stderr.read()
        flags = ("--url", f"127.0.0.1:{grpc}", "--max-tokens", "8", "--stream", "--json")
        chat = run("query", "--chat", USER, "--system", SYSTEM, "--tokenizer", str(repo), *flags)
        plain = run("query", rendered, *flags)
        direct = query(Request(rendered, max_tokens=8), url=f"127.0.0.1:{grpc}", timeout=60)
    finally:
        stop_serve(serve)
    assert chat.returncode == 0 and plain.returncode == 0, chat.stderr + plain.stderr
    assert json.loads(chat.stdout)["text"] == json.loads(plain.stdout)["text"] == direct.text
    assert direct.text and direct.finish_reason in ("stop", "length")
    assert serve.returncode == 0

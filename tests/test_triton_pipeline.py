"""The python models' logic without a server: tokenizer, incremental detokenization, request
validation, and the cpu engine's request loop on the real reference runtime."""

from __future__ import annotations

import time

import numpy as np
import pytest
from triton_support import tiny_spec, write_tokenizer

from export.runtime.detok import IncrementalDecoder, text_delta
from export.triton.pipeline import (
    EngineRequest,
    EngineRunner,
    Limits,
    RequestError,
    engine_outputs,
    engine_request,
    load_tokenizer,
    no_text,
    postprocess,
    preprocess,
    stop_id,
)
from export.triton.requests import split_word_list, word_list

TEXT = "héllo wörld 中文 🙂 the fox"
LIMITS = Limits(max_input_len=32, max_seq_len=48)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir))


def test_tokenizer_matches_transformers(tok, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    ids = tok.encode(TEXT)
    assert ids == hf.encode(TEXT) and tok.decode(ids) == hf.decode(ids) == TEXT
    assert tok.eos_token_id == hf.eos_token_id == 2 and len(tok) == len(hf)


def test_streamed_pieces_keep_spaces_and_multibyte_characters(tok):
    ids = tok.encode(TEXT)
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive != TEXT  # one-by-one decoding really garbles this text (so the check below can fail)
    pieces = []
    for k in range(1, len(ids) + 1):  # what postprocessing sees for a stream of one token per response
        out = postprocess(tok, {"TOKENS_BATCH": np.array([[ids[k - 1:k]]], dtype=np.int32),
                                "SEQUENCE_LENGTH": np.array([[1]], dtype=np.int32),
                                "GENERATED_IDS": np.array([ids[:k]], dtype=np.int32),
                                "IS_FINAL": np.array([[k == len(ids)]])})
        pieces.append(out["OUTPUT"][0, 0].decode("utf-8"))
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces)
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push([i]) for i in ids) + dec.finish() == TEXT


def test_an_incomplete_tail_is_flushed_at_the_end(tok):
    ids = tok.encode("中")
    assert len(ids) > 1
    assert text_delta(tok, ids[:-1], 0, final=False) == ""       # held back while incomplete
    assert text_delta(tok, ids[:-1], 0, final=True) == "\ufffd"  # the stream ended there: emitted


def inputs(**kw):
    base = {"QUERY": np.array([[TEXT.encode()]], dtype=object), "REQUEST_OUTPUT_LEN": np.array([[4]], dtype=np.int32)}
    return {**base, **kw}


def test_preprocess_outputs(tok):
    out = preprocess(tok, inputs(STOP_WORDS_DICT=np.array([[b"the fox", b"zz"]], dtype=object)), LIMITS)
    ids = tok.encode(TEXT)
    assert out["INPUT_ID"].tolist() == [ids] and out["REQUEST_INPUT_LEN"].tolist() == [[len(ids)]]
    assert out["OUT_END_ID"].tolist() == [[2]] and out["BAD_WORDS_IDS"].shape == (1, 2, 0)
    assert split_word_list(out["STOP_WORDS_IDS"]) == [tok.encode("the fox"), tok.encode("zz")]


@pytest.mark.parametrize(("override", "message"), [
    ({"QUERY": None}, "text_input: required input is missing"),
    ({"QUERY": np.array([[b"\xff\xfe bad"]], dtype=object)}, "text_input: not valid UTF-8"),
    ({"REQUEST_OUTPUT_LEN": np.array([[0]], dtype=np.int32)}, r"max_tokens must be >= 1 \(got 0\)"),
    ({"REQUEST_OUTPUT_LEN": np.array([[1000]], dtype=np.int32)}, r"max_tokens 1000 exceeds the limit \d+"),
    ({"TEMPERATURE": np.array([[-0.5]], dtype=np.float32)}, r"temperature must be >= 0 \(got -0.5\)"),
    ({"RUNTIME_TOP_P": np.array([[0.0]], dtype=np.float32)}, r"top_p must be in \(0, 1\]"),
    ({"RUNTIME_TOP_K": np.array([[-1]], dtype=np.int32)}, "top_k must be >= 0"),
])
def test_bad_requests_name_the_input(tok, override, message):
    with pytest.raises(RequestError, match=message):
        preprocess(tok, inputs(**override), LIMITS)


def test_word_list_round_trip():
    wl = word_list(["ab", "", "c"], lambda s: [ord(ch) for ch in s])
    assert wl.tolist() == [[97, 98, 99], [2, 3, -1]]
    assert split_word_list(wl) == [[97, 98], [99]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tok):
    from export.runtime.engine import Engine
    from export.synthetic import write_random_checkpoint

    src = write_random_checkpoint(tmp_path_factory.mktemp("hf") / "m", tiny_spec(len(tok)), std=0.2)
    with Engine.start(src) as e:
        yield e


def test_engine_runner_streams_what_generate_returns(engine, tok):
    from export.runtime.sampling import SamplingParams

    prompt = tok.encode(TEXT)
    ref = engine.generate([prompt], SamplingParams(max_tokens=10))[0]
    runner = EngineRunner(engine)
    steps = list(runner.steps(EngineRequest(prompt, 10, -1, [], streaming=True)))
    assert [t for s in steps for t in s.new] == ref and steps[-1].final and not any(s.final for s in steps[:-1])
    assert steps[-1].generated == ref
    (one,) = runner.steps(EngineRequest(prompt, 10, -1, [], streaming=False))
    assert one.new == ref and one.final
    # a stop word (the 3rd..4th generated ids) ends generation there; an end id is not part of the output
    stop = list(runner.steps(EngineRequest(prompt, 10, -1, [ref[2:4]], streaming=False)))[-1]
    first = next(k for k in range(2, 11) if ref[k - 2:k] == ref[2:4])
    assert stop.generated == ref[:first] and stop.final
    ended = list(runner.steps(EngineRequest(prompt, 10, ref[3], [], streaming=True)))
    assert ended[-1].final and ended[-1].generated == ref[:ref.index(ref[3])]
    out = engine_outputs(ended[-1], 7)
    assert out["output_ids"].shape[:2] == (1, 1) and out["is_final"].tolist() == [[True]]
    assert out["request_key"].tolist() == [[7]] and stop_id(7) != stop_id(8)
    blank = no_text({"TOKENS_BATCH": np.zeros((2, 1, 3), dtype=np.int32)})  # a cancelled postprocessing step
    assert blank["OUTPUT"].tolist() == [[b""], [b""]] and blank["NUM_OUTPUT_TOKENS"].tolist() == [[0], [0]]



def test_a_slow_consumer_gets_queued_steps_coalesced(engine, tok):
    """A stream that falls behind the engine gets what queued meanwhile in one response: the same
    tokens in the same order, in fewer responses than steps."""
    import time

    from export.runtime.sampling import SamplingParams

    prompt = tok.encode(TEXT)
    ref = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
    runner = EngineRunner(engine)
    slow = []
    for step in runner.steps(EngineRequest(prompt, 12, -1, [], streaming=True)):
        slow.append(step)
        time.sleep(0.2)  # several engine steps finish while this response is "being sent"
    assert [t for s in slow for t in s.new] == ref == slow[-1].generated
    assert max(len(s.new) for s in slow) > 1 and len(slow) <= len(ref) // 2
    assert all(s.generated == ref[:len(s.generated)] for s in slow)

def test_engine_request_validation():
    ok = {"input_ids": np.array([[5, 6, 7]], dtype=np.int32), "input_lengths": np.array([[3]], dtype=np.int32),
          "request_output_len": np.array([[4]], dtype=np.int32)}
    req = engine_request(ok, max_seq_len=16)
    assert req.prompt == [5, 6, 7] and req.max_tokens == 4 and not req.streaming
    with pytest.raises(RequestError, match="bad_words: not supported by the cpu engine"):
        engine_request({**ok, "bad_words_list": np.array([[[5], [1]]], dtype=np.int32)}, 16)
    with pytest.raises(RequestError, match="one sequence per request"):
        engine_request({**ok, "input_ids": np.array([[5], [6]], dtype=np.int32)}, 16)
    with pytest.raises(RequestError, match=r"max_tokens 40 exceeds the limit 13"):
        engine_request({**ok, "request_output_len": np.array([[40]], dtype=np.int32)}, 16)


@pytest.mark.parametrize(("override", "message"), [
    ({"input_lengths": np.array([[-1]], dtype=np.int32)}, r"input_lengths: -1 is outside \[1, 3\]"),
    ({"input_lengths": np.array([[0]], dtype=np.int32)}, r"input_lengths: 0 is outside \[1, 3\]"),
    ({"input_lengths": np.array([[10**6]], dtype=np.int32)}, r"input_lengths: 1000000 is outside \[1, 3\]"),
    ({"input_ids": np.array([[5, -5, 7]], dtype=np.int32)}, r"input_ids: token id -5 outside the vocabulary \[0, 100"),
    ({"input_ids": np.array([[5, 100, 7]], dtype=np.int32)}, r"input_ids: token id 100 outside the vocabulary"),
])
def test_raw_engine_tensors_are_checked_against_their_shape_and_vocabulary(override, message):
    """input_lengths -1 used to drop the last prompt token silently, 10^6 was accepted."""
    ok = {"input_ids": np.array([[5, 6, 7]], dtype=np.int32), "input_lengths": np.array([[3]], dtype=np.int32),
          "request_output_len": np.array([[4]], dtype=np.int32)}
    assert engine_request(ok, 16, vocab=100).prompt == [5, 6, 7]
    with pytest.raises(RequestError, match=message):
        engine_request({**ok, **override}, 16, vocab=100)


@pytest.mark.parametrize(("override", "message"), [
    ({"TOKENS_BATCH": np.array([[[5, -5]]], dtype=np.int32)}, r"TOKENS_BATCH: token id -5 outside the vocabulary"),
    ({"TOKENS_BATCH": np.array([[[5, 10**6]]], dtype=np.int32)}, r"TOKENS_BATCH: token id 1000000 outside"),
    ({"SEQUENCE_LENGTH": np.array([[3]], dtype=np.int32)}, r"SEQUENCE_LENGTH: 3 is outside \[0, 2\]"),
    ({"SEQUENCE_LENGTH": np.array([[-1]], dtype=np.int32)}, r"SEQUENCE_LENGTH: -1 is outside \[0, 2\]"),
    ({"GENERATED_IDS": np.array([[7, -5]], dtype=np.int32)}, r"GENERATED_IDS: token id -5 outside"),
])
def test_postprocess_checks_lengths_and_ids(tok, override, message):
    """id -5 used to fail in the tokenizer with `number too small to fit in target type`."""
    ok = {"TOKENS_BATCH": np.array([[[5, 6]]], dtype=np.int32), "SEQUENCE_LENGTH": np.array([[2]], dtype=np.int32),
          "GENERATED_IDS": np.array([[5, 6]], dtype=np.int32), "IS_FINAL": np.array([[True]])}
    assert postprocess(tok, ok)["NUM_OUTPUT_TOKENS"].tolist() == [[2]]
    with pytest.raises(RequestError, match=message):
        postprocess(tok, {**ok, **override})


def test_postprocess_decodes_ids_the_model_has_past_the_tokenizers(tok):
    """A model's vocabulary may be padded past its tokenizer's: such an id is no error (it decodes
    to nothing, as `tokenizers` decodes it); past the model's vocabulary it is."""
    past = len(tok) + 3
    ok = {"TOKENS_BATCH": np.array([[[5, past]]], dtype=np.int32), "SEQUENCE_LENGTH": np.array([[2]], dtype=np.int32)}
    assert postprocess(tok, ok, vocab=past + 1)["NUM_OUTPUT_TOKENS"].tolist() == [[2]]
    with pytest.raises(RequestError, match=f"token id {past} outside the vocabulary"):
        postprocess(tok, ok, vocab=past)


def test_an_oversized_prompt_is_refused_before_tokenizing(tok):
    """8 MB used to be tokenized (13 s) before the length check; now its size is checked first."""
    import time

    huge = inputs(QUERY=np.array([[b"a" * (8 << 20)]], dtype=object))
    start = time.perf_counter()
    with pytest.raises(RequestError, match=r"text_input: 8388608 bytes exceed the limit of 512 bytes"):
        preprocess(tok, huge, LIMITS)
    assert time.perf_counter() - start < 0.05
    with pytest.raises(RequestError, match=r"exceed the limit of 100 bytes"):
        preprocess(tok, inputs(QUERY=np.array([["é" * 51]], dtype=object)), Limits(32, 48, max_input_bytes=100))


def test_request_integers_must_fit_triton_int32():
    """Triton turns HTTP JSON max_tokens 4294967301 into INT32 5 before any model sees it (measured
    in test_triton_server.py); our client refuses it instead of being served 5 tokens."""
    from export.errors import ExportError
    from export.triton.client import Request

    with pytest.raises(ExportError, match=r"max_tokens 4294967301 does not fit Triton's INT32 input "
                                          r"\(the server would see 5\)"):
        Request("hi", max_tokens=4294967301)
    with pytest.raises(ExportError, match=r"end_id -2147483649 does not fit"):
        Request("hi", end_id=-2**31 - 1)
    with pytest.raises(ExportError, match="seed -1 does not fit"):
        Request("hi", seed=-1)
    assert Request("hi", max_tokens=2**31 - 1).fields()["max_tokens"] == 2**31 - 1


def test_cancel_probe_is_rate_limited_and_sticky() -> None:
    """The engine model asks the server whether a client cancelled at most once per interval (each ask
    is a round trip to the server process); once it said yes, the answer stays yes without asking."""
    from export.triton.stub import at_most_every

    answers, asked = iter([False, True]), []

    def check() -> bool:
        asked.append(1)
        return next(answers)

    probe = at_most_every(0.05, check)
    assert [probe() for _ in range(50)] == [False] * 50 and len(asked) == 1  # one ask in the interval
    time.sleep(0.06)
    assert probe() is True and len(asked) == 2
    assert all(probe() for _ in range(10)) and len(asked) == 2  # sticky: not asked again

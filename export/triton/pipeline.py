"""What the python models do, as plain functions over numpy arrays (tested without a server).

`preprocess` and `postprocess` are the bodies of the `preprocessing` / `postprocessing` models;
`EngineRunner` turns one `tensorrt_llm` request into engine steps for the cpu flavour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.runtime.detok import text_delta
from export.runtime.params import SamplingParams
from export.triton.requests import (
    Limits,
    RequestError,
    check_ids,
    check_length,
    check_text_bytes,
    decode_text,
    request_params,
    scalar,
    split_word_list,
    stack_word_lists,
    text_rows,
    word_list,
)

Arrays = dict[str, np.ndarray | None]
# setting -> the input a request sets it with, for errors: the ensemble's (and BLS') inputs, and the
# `tensorrt_llm` model's own (its output length keeps the name `max_tokens` every layout's errors use)
ENSEMBLE_NAMES = {"max_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}
ENGINE_NAMES = {"max_tokens": "max_tokens", "temperature": "temperature", "top_k": "runtime_top_k",
                "top_p": "runtime_top_p", "seed": "seed", "stop_sequences": "stop_words_list"}


def load_tokenizer(path: str) -> Any:
    """The engine's own tokenizer files, offline (`tokenizers` only: see `export.io.tokenizer` for why)."""
    from export.io.tokenizer import load_tokenizer as load

    return load(None, path, kind="serving")


def default_ids(tokenizer: Any) -> tuple[int, int]:
    """(end_id, pad_id): the tokenizer's eos (-1 if none), pad falling back to eos, then 0."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else max(end, 0)
    return int(end), int(pad)


def preprocess(tokenizer: Any, inputs: Arrays, limits: Limits,
               add_special_tokens: bool = True) -> dict[str, np.ndarray]:
    """QUERY [B,1] -> padded INPUT_ID [B,L] and the other preprocessing outputs; RequestError if bad."""
    query = inputs.get("QUERY")
    if query is None:
        raise RequestError("text_input: required input is missing")
    check_text_bytes(query, "text_input", limits.input_bytes)  # before decoding or tokenizing anything
    texts = [row[0] for row in text_rows(query, "text_input")]
    end_default, pad_default = default_ids(tokenizer)
    rows, out_lens, ends, pads = [], [], [], []
    for b, text in enumerate(texts):
        if not text:
            raise RequestError("text_input: empty prompt")
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        params = request_params(ENSEMBLE_NAMES, len(ids), limits,
                                max_tokens=scalar(inputs.get("REQUEST_OUTPUT_LEN"), "max_tokens", None, b),
                                temperature=scalar(inputs.get("TEMPERATURE"), "temperature", None, b),
                                top_k=scalar(inputs.get("RUNTIME_TOP_K"), "top_k", None, b),
                                top_p=scalar(inputs.get("RUNTIME_TOP_P"), "top_p", None, b))
        out_lens.append(params.max_tokens)
        rows.append(ids)
        ends.append(scalar(inputs.get("END_ID"), "end_id", end_default, b))
        pads.append(scalar(inputs.get("PAD_ID"), "pad_id", pad_default, b))
    width = max(len(r) for r in rows)
    input_ids = np.array([r + [pads[i]] * (width - len(r)) for i, r in enumerate(rows)], dtype=np.int32)

    def words(name: str) -> np.ndarray:
        per_row = text_rows(inputs.get(name), name.lower()) or [[] for _ in rows]
        return stack_word_lists([word_list(w, lambda s: tokenizer.encode(s, add_special_tokens=False))
                                 for w in per_row])

    col = lambda xs: np.array(xs, dtype=np.int32).reshape(-1, 1)  # noqa: E731
    return {"INPUT_ID": input_ids, "REQUEST_INPUT_LEN": col([len(r) for r in rows]),
            "REQUEST_OUTPUT_LEN": col(out_lens), "OUT_END_ID": col(ends), "OUT_PAD_ID": col(pads),
            "BAD_WORDS_IDS": words("BAD_WORDS_DICT"), "STOP_WORDS_IDS": words("STOP_WORDS_DICT")}


def postprocess(tokenizer: Any, inputs: Arrays, skip_special_tokens: bool = True,
                vocab: int | None = None) -> dict[str, np.ndarray]:
    """TOKENS_BATCH [B, beam, T] -> OUTPUT [B, 1]; incremental when GENERATED_IDS is given.
    Lengths must lie within the tensor and ids within the model's `vocab` (default: the tokenizer's
    size), else RequestError. A model's vocabulary may be padded past its tokenizer's; such ids
    decode to no text, as the tokenizers library decodes them."""
    tokens = np.asarray(inputs["TOKENS_BATCH"])
    if tokens.ndim != 3:
        raise RequestError(f"TOKENS_BATCH: expected [batch, beam, tokens], got shape {list(tokens.shape)}")
    lengths = np.asarray(inputs["SEQUENCE_LENGTH"]).reshape(tokens.shape[0], -1)
    generated, final = inputs.get("GENERATED_IDS"), inputs.get("IS_FINAL")
    vocab = vocab or len(tokenizer)
    texts, counts = [], []
    for b in range(tokens.shape[0]):
        new = tokens[b, 0, :check_length(lengths[b, 0], "SEQUENCE_LENGTH", tokens.shape[2], 0)].tolist()
        check_ids(new, "TOKENS_BATCH", vocab)
        if generated is None:  # TensorRT-LLM's own engine: each response decoded alone
            text = tokenizer.decode(new, skip_special_tokens=skip_special_tokens)
        else:
            all_ids = np.asarray(generated)[b].tolist()
            check_ids(all_ids, "GENERATED_IDS", vocab)
            if len(all_ids) < len(new):
                raise RequestError(f"GENERATED_IDS: {len(all_ids)} ids, fewer than the {len(new)} new ones")
            is_final = bool(scalar(final, "IS_FINAL", True, b))
            text = text_delta(tokenizer, all_ids, len(all_ids) - len(new), is_final, skip_special_tokens)
        texts.append(text.encode("utf-8"))
        counts.append(len(new))
    return {"OUTPUT": np.array(texts, dtype=object).reshape(-1, 1),
            "NUM_OUTPUT_TOKENS": np.array(counts, dtype=np.int32).reshape(-1, 1)}


def no_text(inputs: Arrays) -> dict[str, np.ndarray]:
    """postprocessing's outputs with no text, for each row of TOKENS_BATCH (a cancelled step)."""
    rows = np.asarray(inputs["TOKENS_BATCH"]).shape[0]
    return {"OUTPUT": np.array([[b""]] * rows, dtype=object),
            "NUM_OUTPUT_TOKENS": np.zeros((rows, 1), dtype=np.int32)}


# ---- the cpu engine model ------------------------------------------------------------------
@dataclass(frozen=True)
class EngineRequest:
    """One request for the engine. `sampling` is the SamplingParams its front end built (and
    checked) from the request; built directly (tests, benchmarks), it is made from these fields."""

    prompt: list[int]
    max_tokens: int
    end_id: int
    stop_words: list[list[int]]
    streaming: bool
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    sampling: SamplingParams | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.sampling is None:
            object.__setattr__(self, "sampling", SamplingParams(
                max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                seed=self.seed, stop_token_ids=(self.end_id,) if self.end_id >= 0 else (),
                stop_sequences=tuple(tuple(w) for w in self.stop_words if w)))

    @classmethod
    def of(cls, prompt: list[int], params: SamplingParams, end_id: int, stop_words: list[list[int]],
           streaming: bool) -> EngineRequest:
        """A request whose settings are `params` (already checked, with its inputs' names)."""
        return cls(prompt, params.max_tokens, end_id, stop_words, streaming, params.temperature, params.top_k,
                   params.top_p, params.seed, sampling=params)


@dataclass(frozen=True)
class Step:
    """One response: the tokens new in it, every token generated so far, and whether it is the last."""

    new: list[int]
    generated: list[int]
    final: bool


def engine_request(inputs: Arrays, max_seq_len: int, vocab: int | None = None) -> EngineRequest:
    """The `tensorrt_llm` inputs of one request (batch 1, as TensorRT-LLM's in-flight batcher requires).
    `input_lengths` must lie within `input_ids` and the prompt's ids within `vocab` (when given)."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise RequestError("input_ids: required input is missing")
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise RequestError(f"input_ids: the engine takes one sequence per request, got batch {ids.shape[0]}")
    width = ids.shape[-1] if ids.ndim else 1
    length = check_length(scalar(inputs.get("input_lengths"), "input_lengths", width), "input_lengths", width)
    prompt = ids.reshape(-1)[:length].tolist()
    check_ids(prompt, "input_ids", vocab)
    end_id = int(scalar(inputs.get("end_id"), "end_id", -1))
    stop_words = split_word_list(inputs.get("stop_words_list"))
    params = request_params(ENGINE_NAMES, len(prompt), Limits(max_seq_len, max_seq_len),
                            max_tokens=scalar(inputs.get("request_output_len"), "request_output_len"),
                            temperature=scalar(inputs.get("temperature"), "temperature"),
                            top_k=scalar(inputs.get("runtime_top_k"), "runtime_top_k"),
                            top_p=scalar(inputs.get("runtime_top_p"), "runtime_top_p"),
                            seed=scalar(inputs.get("seed"), "seed"),
                            stop_token_ids=(end_id,) if end_id >= 0 else (),
                            stop_sequences=[w for w in stop_words if w])
    if split_word_list(inputs.get("bad_words_list")):
        raise RequestError("bad_words: not supported by the cpu engine (the reference runtime has no logit bans)")
    return EngineRequest.of(prompt, params, end_id, stop_words,
                            bool(scalar(inputs.get("streaming"), "streaming", False)))


class EngineRunner:
    """Runs requests on one `Engine`'s scheduler: concurrent requests share its decode steps."""

    poll_s = 0.05  # how often a waiting request looks at its client's cancel flag

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def params(self, req: EngineRequest) -> SamplingParams:
        assert req.sampling is not None  # set by EngineRequest.__post_init__
        return req.sampling

    def steps(self, req: EngineRequest, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        """Streaming: a Step per engine step; else one Step. The last Step has final=True.

        `cancelled` is polled between outputs; when it turns true (or this iterator is closed) the
        request is cancelled and the engine frees its slot at its next step. Raises BusyError when
        the engine's wait queue is full."""
        generated: list[int] = []
        pending: list[int] = []
        handle = self.engine.submit(req.prompt, self.params(req))
        try:
            while not handle.finished:
                out = handle.poll(self.poll_s)
                if cancelled():
                    return
                if out is None:
                    continue
                new = [int(t) for t in out.tokens] + _queued_tokens(handle)
                if req.end_id >= 0 and req.end_id in new:
                    new = new[:new.index(req.end_id)]  # the end token is not part of the output
                generated += new
                pending += new
                if req.streaming and not handle.finished and new:
                    yield Step(pending, list(generated), False)
                    pending = []
            yield Step(pending, list(generated), True)
        finally:
            handle.cancel()


def _queued_tokens(handle: Any) -> list[int]:
    """Tokens of the steps that finished while the last response was being sent.

    A stream whose consumer falls behind the engine (many streams, one python stub) gets them in
    one response instead of one response per step: the same tokens and text, fewer messages
    through the server (vLLM's and TGI's streams coalesce the same way). An idle stream is never
    held back: this only takes what is already queued."""
    tokens: list[int] = []
    while not handle.finished:
        out = handle.poll(0)
        if out is None:
            break
        tokens += [int(t) for t in out.tokens]
    return tokens


def engine_outputs(step: Step, key: int) -> dict[str, np.ndarray]:
    """TensorRT-LLM's outputs plus the cpu engine's extras: every id so far and the final flag (for
    incremental detokenization) and the request's key (so postprocessing can stop it, see `stop_id`)."""
    return {"output_ids": np.array([[step.new]], dtype=np.int32).reshape(1, 1, -1),
            "sequence_length": np.array([[len(step.new)]], dtype=np.int32),
            "generated_ids": np.array([step.generated], dtype=np.int32).reshape(1, -1),
            "is_final": np.array([[step.final]], dtype=bool),
            "request_key": np.array([[key]], dtype=np.int64)}


IN_BAND_PREFIX = "bls-"  # request ids of the BLS's engine requests


def wants_in_band_errors(request_id: str, requested: Any) -> bool:
    """Errors go in-band (`error_outputs`) to the BLS only: other clients ask for every output by
    default, and must see an error response."""
    return request_id.startswith(IN_BAND_PREFIX) and "error_message" in list(requested)


def error_outputs(message: str) -> dict[str, np.ndarray]:
    """The cpu engine's in-band error: a final response with `error_message` (for the BLS, whose
    decoupled response iterator drops error responses in Triton 2.51)."""
    return {"error_message": np.array([[message.encode("utf-8")]], dtype=object),
            "is_final": np.array([[True]], dtype=bool)}


def stop_id(key: int) -> str:
    """The request id under which the cpu engine also registers the request with this key.

    Triton (2.51) does not cancel a running composing request when its ensemble request is
    cancelled; it only cancels the steps it schedules afterwards. So postprocessing, whose next
    step arrives cancelled, sends TensorRT-LLM's stop request (`stop` = true) for this id: the
    engine frees the slot. Clients' own request ids need not be unique; this one is."""
    return f"cpu-engine-{key}"


__all__ = [
    "EngineRunner",
    "Limits",
    "RequestError",
    "decode_text",
    "engine_outputs",
    "engine_request",
    "error_outputs",
    "load_tokenizer",
    "postprocess",
    "preprocess",
]

"""Text in, text out: the tokenizer shipped with a checkpoint, and timed generation for `generate`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from export.io.tokenizer import load_tokenizer
from export.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: list[int]
    prefill_s: float  # prompt in, first token out
    decode_s: float  # the remaining tokens
    tp: int
    pp: int

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput (tokens after the first, over the time they took)."""
        n = len(self.new_tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"tokens_per_s": round(self.tokens_per_s, 2)}


def build_max_seq_len(ckpt: Path) -> int | None:
    """The request limit an `engines/NAME` directory was built for (its manifest's build.max_seq_len,
    what its Triton repository serves with); None for a bare checkpoint (the engine then uses the
    model's max_position_embeddings)."""
    from export.engine_dir import EngineDir

    engine = EngineDir.of(ckpt)
    return int(engine.manifest.build["max_seq_len"]) if engine is not None else None


def generate_text(ckpt: Path, prompt: str, params: SamplingParams, *, tp: int | None = None, pp: int | None = None,
                  dtype: str = "float32", tokenizer: Path | None = None, stop_at_eos: bool = True,
                  threads: int = 1, runtime: str = "torch",
                  on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Tokenize, stream new tokens from an `Engine`, detokenize; timings split prefill / decode.

    `on_text` gets the text as it is produced (incrementally detokenized: spaces and multi-byte
    characters intact), as a user watching `generate` expects.
    """
    from dataclasses import replace

    from export.runtime.detok import IncrementalDecoder
    from export.runtime.engine import Engine

    tok = load_tokenizer(ckpt, tokenizer)
    ids = tok.encode(prompt)
    with Engine.start(Path(ckpt), tp=tp, pp=pp, dtype=dtype, threads=threads, runtime=runtime,
                      max_seq_len=build_max_seq_len(Path(ckpt))) as eng:
        eos = eng.spec.passthrough.get("eos_token_id", tok.eos_token_id)
        if stop_at_eos and eos is not None and not params.stop_token_ids:
            params = replace(params, stop_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = t0
        detok = IncrementalDecoder(tok)
        for step in eng.stream(ids, params):
            if not out:
                t_first = time.perf_counter()
            out += step
            if on_text is not None:
                on_text(detok.push(step))
        t_end = time.perf_counter()
        if on_text is not None:
            on_text(detok.finish())
        mapping = eng.mapping
    return GenerationResult(tok.decode(out, skip_special_tokens=True), len(ids), out, t_first - t0,
                            t_end - t_first, mapping.tp, mapping.pp)

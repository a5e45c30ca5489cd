"""The request contract: one SamplingParams per request, errors named by the request's inputs, one
length rule with one limit; and the rank facts `Mapping` gives the runtime."""

import numpy as np
import pytest

from export.mapping import Mapping
from export.runtime.params import BadSamplingParams, SamplingParams, length_problem
from export.triton.pipeline import engine_request
from export.triton.requests import Limits, RequestError, request_params


def test_errors_name_the_input_the_request_used():
    with pytest.raises(BadSamplingParams, match=r"bad sampling parameters: --temperature must be >= 0 \(got -1.0\)"):
        SamplingParams.from_request({"temperature": "--temperature"}, temperature=-1)
    with pytest.raises(BadSamplingParams) as e:
        SamplingParams.from_request({"top_k": "runtime_top_k"}, max_tokens=0, top_k=-1)
    assert e.value.problems == ["max_tokens must be >= 1 (got 0)", "runtime_top_k must be >= 0 (got -1)"]
    with pytest.raises(RequestError, match=r"^runtime_top_p must be in \(0, 1\] \(got 0.0\)$"):
        engine_request({"input_ids": np.array([[5, 6]], dtype=np.int32), "input_lengths": np.array([[2]]),
                        "request_output_len": np.array([[2]]), "runtime_top_p": np.array([[0.0]])}, 16)


def test_a_request_is_built_once_with_its_types_and_defaults():
    p = request_params({}, 3, Limits(8, 16), max_tokens=np.int32(4).item(), temperature=None, top_k=2, seed=7)
    assert p == SamplingParams(max_tokens=4, top_k=2, seed=7) and isinstance(p.max_tokens, int)
    req = engine_request({"input_ids": np.array([[5, 6, 7]], dtype=np.int32), "input_lengths": np.array([[3]]),
                          "request_output_len": np.array([[4]]), "end_id": np.array([[2]])}, 16)
    assert req.sampling == SamplingParams(max_tokens=4, stop_token_ids=(2,))


def test_one_length_rule():
    assert length_problem(3, 13, 16) is None
    assert length_problem(3, 14, 16) == "max_tokens 14 exceeds the limit 13 (max_seq_len 16 - 3 prompt tokens)"
    assert length_problem(17, 0, 16) == "17 prompt tokens exceed max_seq_len 16"
    named = SamplingParams.from_request({"max_tokens": "--max-tokens"}, max_tokens=10)
    assert named.length_problem(250, 256, "max_position_embeddings").startswith("--max-tokens 10 exceeds the limit 6")


def test_mapping_gives_the_runtime_its_groups_and_neighbours():
    m = Mapping(2, 3)
    assert [m.stage_ranks(s) for s in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert m.tp_group(3) == [2, 3] and m.leader == 4
    assert [m.prev_rank(r) for r in m.ranks()] == [None, None, 0, 1, 2, 3]
    assert [m.next_rank(r) for r in m.ranks()] == [2, 3, 4, 5, None, None]
    assert Mapping().leader == 0 and Mapping().prev_rank(0) is None and Mapping().next_rank(0) is None

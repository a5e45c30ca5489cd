"""The step protocol (Reserve/Prefill/Decode/Free/Logits/Stats) run by ONNX Runtime, tp = 1.

The graph is stateless (past in, present out); this backend owns the KV cache as the PyTorch
runtime does (`KVCache`, full-attention layers only, addressed by slot, with the bookkeeping of
`steps.SlotSteps` they share), so the engine's driver and its scheduler cannot tell the two
runtimes apart. A step over slots of different lengths pads the slots' past to the longest and
masks the padding with attention_mask. Registered as runtime "onnx" in `export.runtime.registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.engine_dir import onnx_dir as find_onnx_dir
from export.errors import ExportError
from export.mapping import Mapping
from export.onnx.graph import MODEL_FILE, kv_names
from export.runtime.cache import KVCache
from export.runtime.steps import SlotSteps
from export.spec import ModelSpec, normalize_dtype

GRAPH_DTYPE = "float32"


def make_session(model: Path, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), opts, providers=list(providers))


class OnnxBackend(SlotSteps):
    """A `Backend` (one rank) over an ORT session; `SlotSteps` keeps the KV-cache bookkeeping,
    this class only runs the graph (`extend`, `full_logits`)."""

    def __init__(self, onnx_dir: Path, spec: ModelSpec, threads: int = 1) -> None:
        self.spec = spec
        self.session = make_session(Path(onnx_dir) / MODEL_FILE, threads)
        self.kv_heads = {i: int(spec.layers[i].attention.kv_heads or 0) for i in spec.attention_layers()}
        self.cache = KVCache(self.kv_heads, spec.head_dim, torch.float32, "cpu")
        self.outputs = ["logits"] + [n for i in self.kv_heads for n in kv_names(i)[2:]]

    def call(self, cmd: Any) -> list[Any]:
        return [self.run(cmd)]

    def close(self) -> None:
        self.session = None

    # ---- one graph run -----------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             past: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, list[np.ndarray]]:
        if self.session is None:
            raise ExportError("the ONNX engine is closed")
        feed = {"input_ids": ids.numpy(), "position_ids": positions.numpy(), "attention_mask": mask.numpy()}
        for i, (k, v) in past.items():
            pk, pv, _, _ = kv_names(i)
            feed[pk], feed[pv] = k, v
        logits, *presents = self.session.run(self.outputs, feed)
        return torch.from_numpy(logits), presents

    # ---- the forward step ----------------------------------------------------------------------
    def extend(self, slots: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
               start: torch.Tensor) -> torch.Tensor:
        """Prefill and decode alike: the slots' past in (padded to the longest, masked), the new
        entries of present out into the cache at the slots' positions."""
        t, past_len = ids.shape[1], int(start.max())
        mask = torch.cat([torch.arange(past_len) < start[:, None], torch.arange(t) < lens[:, None]], dim=1)
        positions = start[:, None] + torch.arange(t)
        # numpy views of the cache tensors: plain slicing here costs microseconds, torch indexing ~100x more
        stores = {i: (self.cache.k[i].numpy(), self.cache.v[i].numpy()) for i in self.kv_heads}
        idx = slots.numpy()
        past = {i: (k[idx, :, :past_len], v[idx, :, :past_len]) for i, (k, v) in stores.items()}
        logits, presents = self._run(ids, positions, mask.long(), past)
        spans = list(zip(slots.tolist(), start.tolist(), lens.tolist()))
        for n, i in enumerate(self.kv_heads):
            for store, present in zip(stores[i], presents[2 * n:2 * n + 2]):
                for row, (slot, first, count) in enumerate(spans):  # the new entries only, at the slot's positions
                    store[slot, :, first:first + count] = present[row, :, past_len:past_len + count]
        return logits[torch.arange(len(spans)), lens - 1]

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        empty = {i: (np.zeros((b, h, 0, self.spec.head_dim), np.float32),) * 2 for i, h in self.kv_heads.items()}
        positions = torch.arange(t).expand(b, -1).contiguous()
        logits, _ = self._run(ids, positions, torch.ones(b, t, dtype=torch.long), empty)
        return logits

    def sync_counts(self) -> dict[str, int]:
        return {"rank": 0, "tp_collectives": 0, "pp_transfers": 0}


def start_onnx(source: Path, *, tp: int | None, pp: int | None, dtype: str, threads: int,
               python: str | None = None) -> tuple[ModelSpec, Mapping, OnnxBackend]:
    """The "onnx" registry entry's start (`Engine.start(source, runtime="onnx")`): the spec, a
    one-rank mapping and the backend, or a clear refusal. `python` (worker interpreter) does not
    apply: there are no workers."""
    onnx_dir, spec = one_rank_graph("onnx", source, tp, pp, dtype)
    return spec, Mapping(1, 1), OnnxBackend(onnx_dir, spec, threads)


def one_rank_graph(runtime: str, source: Path, tp: int | None, pp: int | None, dtype: str) -> tuple[Path, ModelSpec]:
    """The checks every ONNX runtime's start makes (one process, the graph's dtype), then the
    engine's ONNX directory and its description."""
    if (tp or 1) != 1 or (pp or 1) != 1:
        raise ExportError(f"runtime '{runtime}' runs the whole model in one process (tp=1, pp=1); got tp={tp}, "
                          f"pp={pp}. Use runtime='torch' for tensor/pipeline parallelism")
    if normalize_dtype(dtype) != GRAPH_DTYPE:
        raise ExportError(f"runtime '{runtime}': the exported graph is {GRAPH_DTYPE}; dtype={dtype} is not available")
    onnx_dir = find_onnx_dir(Path(source))
    return onnx_dir, ModelSpec.load(onnx_dir)

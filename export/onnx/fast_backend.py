"""The "onnx-fast" runtime: the engine's ONNX weights in `fast_graph`'s fused graph, run with IO binding.

Per step the "onnx" backend gathers every layer's past out of the cache into new arrays, ORT
concatenates it into a freshly allocated present, and the new rows are copied back. Here the
`KVCache` tensors themselves are GroupQueryAttention's shared past/present buffers: a step binds,
per layer, a pointer into the cache at the first slot of the step (slots are the buffer's outer
dimension, so slots lo..hi are one contiguous [hi - lo, kv, capacity, hd] block) as both input and
output, and the op writes the new rows in place. Slots inside lo..hi that are not in the step run
as idle entries (`query_seqlens` = 0: their cache rows are left as they are, their outputs unused).

Bindings are kept per (block, chunk length, cache buffers): a decode step that runs the same slots
as the last one only writes its ids and lengths into the bound arrays and calls ORT once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.errors import ExportError
from export.mapping import Mapping
from export.onnx.backend import one_rank_graph
from export.onnx.fast_graph import FastDecoderGraph
from export.onnx.graph import MODEL_FILE, kv_names
from export.runtime.cache import KVCache
from export.runtime.steps import Decode, SlotSteps
from export.spec import ModelSpec

BINDINGS_KEPT = 8  # distinct (block, chunk) shapes kept bound: prefill and decode of a few batch sizes


def fast_session(onnx_dir: Path, spec: ModelSpec, threads: int = 1) -> Any:
    """An ORT session of the fused graph over `onnx_dir`'s model.onnx.data (read in place)."""
    import onnx
    import onnxruntime as ort

    where = str(Path(onnx_dir) / MODEL_FILE)
    engine_graph = onnx.load(where, load_external_data=False).graph
    model = FastDecoderGraph(spec, {t.name: t for t in engine_graph.initializer}, where).build()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_dir))
    # ORT's worker threads spin between kernels, so handing each kernel's share to the other thread
    # costs no futex wake-up; by default they also go on spinning after the run, taking the core the
    # engine's scheduler thread and its consumers need between steps. Spinning only during a run
    # (force_spinning_stop) keeps the first and drops the second. Interleaved at 2 threads on 2 idle
    # cores it gave 1.10-1.56x the batch-1 and 1.05-1.18x the batch-16 tokens/s of not spinning at
    # all; beside a busy process it loses at batch 16 (0.59-0.69x), where `--threads 1` (no worker, so
    # nothing spins) is the setting (docs/notes-decode-speed.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@dataclass
class Bound:
    """One IO binding and the arrays it points at (written in place before each run)."""

    binding: Any
    ids: np.ndarray        # [n, T] int64
    seqlens_k: np.ndarray  # [n] int32
    total: np.ndarray      # [] int32
    qlens: np.ndarray      # [n] int32
    keep: np.ndarray       # [n, K] int64: the chunk rows whose logits come back
    logits: torch.Tensor   # [n, K, V]


class OnnxFastBackend(SlotSteps):
    """A `Backend` (one rank) over the fused graph; the cache is `SlotSteps`' `KVCache`, bound in place."""

    def __init__(self, onnx_dir: Path, spec: ModelSpec, threads: int = 1) -> None:
        self.spec = spec
        self.session = fast_session(onnx_dir, spec, threads)
        self.kv_heads = {i: int(spec.layers[i].attention.kv_heads or 0) for i in spec.attention_layers()}
        self.cache = KVCache(self.kv_heads, spec.head_dim, torch.float32, "cpu")
        self._bound: OrderedDict[tuple, Bound] = OrderedDict()

    def call(self, cmd: Any) -> list[Any]:
        return [self.run(cmd)]

    def close(self) -> None:
        self.session = None
        self._bound.clear()

    # ---- binding -------------------------------------------------------------------------------
    def _bind(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], n: int, t: int, keep: int = 1) -> Bound:
        """Bind fresh ids/length/index arrays, a logits buffer for `keep` rows per entry and `kv`
        ([n, kv_i, C, hd] contiguous views) as past and present of every attention layer."""
        if self.session is None:
            raise ExportError("the ONNX engine is closed")
        b = self.session.io_binding()
        arrays = Bound(b, np.zeros((n, t), np.int64), np.zeros(n, np.int32), np.zeros((), np.int32),
                       np.zeros(n, np.int32), np.zeros((n, keep), np.int64), torch.empty(n, keep, self.spec.vocab))
        for name, arr in zip(("input_ids", "seqlens_k", "total_sequence_length", "query_seqlens", "logit_index"),
                             (arrays.ids, arrays.seqlens_k, arrays.total, arrays.qlens, arrays.keep)):
            b.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        b.bind_output("logits", "cpu", 0, np.float32, list(arrays.logits.shape), arrays.logits.data_ptr())
        for i, tensors in kv.items():
            for tensor, past, present in zip(tensors, kv_names(i)[:2], kv_names(i)[2:]):
                shape = list(tensor.shape)
                b.bind_input(past, "cpu", 0, np.float32, shape, tensor.data_ptr())
                b.bind_output(present, "cpu", 0, np.float32, shape, tensor.data_ptr())
        return arrays

    def _block(self, lo: int, n: int, t: int) -> Bound:
        """The binding for cache slots lo..lo+n and chunks of t tokens (made once, then reused)."""
        c = self.cache
        first = next(iter(c.k.values()), None)
        key = (lo, n, t, c.slots, c.max_len, None if first is None else first.data_ptr())
        got = self._bound.get(key)
        if got is None:
            got = self._bind({i: (c.k[i][lo:lo + n], c.v[i][lo:lo + n]) for i in self.kv_heads}, n, t)
            self._bound[key] = got
            while len(self._bound) > BINDINGS_KEPT:
                self._bound.popitem(last=False)
        else:
            self._bound.move_to_end(key)
        return got

    # ---- the forward step ------------------------------------------------------------------------
    def extend(self, slots: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
               start: torch.Tensor) -> torch.Tensor:
        """Prefill and decode alike: one run over the slots' block, the new k/v written in place."""
        lo, hi = int(slots.min()), int(slots.max()) + 1
        t = ids.shape[1]
        if hi - lo > len(slots):  # idle entries read one cached row and need room for the whole chunk
            self.cache.reserve(0, t + 1)
        bound = self._block(lo, hi - lo, t)
        rows = (slots - lo).numpy()
        bound.ids.fill(0)
        bound.qlens.fill(0)
        bound.seqlens_k.fill(0)
        bound.ids[rows] = ids.numpy()
        bound.qlens[rows] = lens.numpy()
        bound.seqlens_k[rows] = (start + lens - 1).numpy()
        bound.keep[rows, 0] = (lens - 1).numpy()  # idle entries keep row 0: their logits are not read
        bound.total[()] = self._positions_fit(int(bound.seqlens_k.max()) + 1)
        self.session.run_with_iobinding(bound.binding)
        return bound.logits[torch.from_numpy(rows), 0]  # a copy: the buffer is reused

    def _decode(self, cmd: Decode) -> torch.Tensor | None:
        """One token for contiguous slots (the scheduler's usual step) in numpy only: what
        `SlotSteps._append` + `extend` do, without ~100 us of torch indexing per step."""
        n, lo = len(cmd.slots), cmd.slots[0]
        if cmd.slots != tuple(range(lo, lo + n)):
            return super()._decode(cmd)
        start = self.cache.lengths.numpy()[lo:lo + n]
        total = self._positions_fit(int(start.max()) + 1)
        self.cache.reserve(lo + n, total)
        start = self.cache.lengths.numpy()[lo:lo + n]  # reserve may have replaced the tensor
        bound = self._block(lo, n, 1)
        bound.ids[:, 0] = cmd.tokens
        bound.qlens.fill(1)
        bound.keep.fill(0)
        bound.seqlens_k[:] = start
        bound.total[()] = total
        self.session.run_with_iobinding(bound.binding)
        start += 1
        return bound.logits[:, 0].clone()

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Cache-free: every row a full chunk over a scratch cache of capacity T (right padding is
        after each row's real tokens, so causality keeps their logits exact)."""
        n, t = ids.shape
        kv = {i: (torch.zeros(n, h, t, self.spec.head_dim), torch.zeros(n, h, t, self.spec.head_dim))
              for i, h in self.kv_heads.items()}
        bound = self._bind(kv, n, t, keep=t)
        bound.ids[:] = ids.numpy()
        bound.keep[:] = np.arange(t)
        bound.qlens.fill(t)
        bound.seqlens_k.fill(t - 1)
        bound.total[()] = t
        self.session.run_with_iobinding(bound.binding)
        return bound.logits

    def _positions_fit(self, total: int) -> int:
        """`total` (tokens after the step), or the one-line refusal: the rotary cache in the graph
        holds max_position_embeddings positions (the engine's max_seq_len defaults to it)."""
        if total > self.spec.max_position_embeddings:
            raise ExportError(f"runtime 'onnx-fast': a sequence of {total} tokens is beyond the model's "
                              f"max_position_embeddings {self.spec.max_position_embeddings} (its rotary cache)")
        return total

    def sync_counts(self) -> dict[str, int]:
        return {"rank": 0, "tp_collectives": 0, "pp_transfers": 0}


def start_onnx_fast(source: Path, *, tp: int | None, pp: int | None, dtype: str, threads: int,
                    python: str | None = None) -> tuple[ModelSpec, Mapping, OnnxFastBackend]:
    """The "onnx-fast" registry entry's start: the engine's ONNX directory (as "onnx" finds it), a
    one-rank mapping and the backend, or a clear refusal."""
    onnx_dir, spec = one_rank_graph("onnx-fast", source, tp, pp, dtype)
    return spec, Mapping(1, 1), OnnxFastBackend(onnx_dir, spec, threads)


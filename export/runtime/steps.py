"""The driver <-> worker protocol: a few step commands, and the executor every rank runs.

The driver decides what runs (prefill these sequences into these slots, one decode step for
these slots, free these slots); every rank executes the same command in lockstep. Because
sequences are addressed by slot, requests can later join and leave a running batch (in-flight
batching) without changing the workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from export.runtime.cache import KVCache
from export.runtime.model import Decoder


@dataclass(frozen=True)
class Reserve:
    """Make room for `slots` sequences of up to `max_len` tokens (grows, keeps contents)."""
    slots: int
    max_len: int


@dataclass(frozen=True)
class Prefill:
    """Append these token lists to these slots' sequences; reply: logits at each list's last token [B, V]."""
    slots: tuple[int, ...]
    seqs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Decode:
    """One token per slot; reply: next-token logits [B, V]."""
    slots: tuple[int, ...]
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Free:
    slots: tuple[int, ...]


@dataclass(frozen=True)
class Logits:
    """Cache-free prefill of right-padded sequences; reply: all logits [B, T, V]."""
    seqs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Stats:
    """Reply: this rank's KV-cache bytes and collectives issued so far."""


@dataclass(frozen=True)
class Exit:
    pass


def pad(seqs: tuple[tuple[int, ...], ...] | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B]."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lens


class SlotSteps(ABC):
    """The step protocol over a slot-addressed `KVCache`: the bookkeeping every runtime shares.

    Reserve/Free, and where each slot's new tokens go (Prefill and Decode both append to the
    slots' sequences), live here once; a runtime supplies only the forward step (`extend`, and
    `full_logits` for the cache-free Logits) and its sync counters (`sync_counts`)."""

    cache: KVCache

    def run(self, cmd: Any) -> Any:
        return getattr(self, f"_{type(cmd).__name__.lower()}")(cmd)

    # ---- what a runtime supplies -------------------------------------------------------------
    @abstractmethod
    def extend(self, slots: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
               start: torch.Tensor) -> torch.Tensor | None:
        """Run right-padded `ids` [B, T] (`lens` real tokens each) at positions start + 0..T-1 of
        `slots`, writing their k/v into the cache (room is reserved); the last real token's logits
        [B, V] (None on a rank that does not return logits)."""

    @abstractmethod
    def full_logits(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Cache-free forward of right-padded `ids` [B, T]: all logits [B, T, V] (or None)."""

    @abstractmethod
    def sync_counts(self) -> dict[str, int]:
        """rank, tp_collectives and pp_transfers so far, for Stats."""

    # ---- commands ----------------------------------------------------------------------------
    def _append(self, slots: tuple[int, ...], ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor | None:
        rows = torch.tensor(slots, dtype=torch.long)
        self.cache.reserve(int(rows.max()) + 1, 0)
        start = self.cache.lengths[rows].clone()
        self.cache.reserve(0, int((start + ids.shape[1]).max()))
        out = self.extend(rows, ids, lens, start)
        self.cache.lengths[rows] = start + lens
        return out

    def _reserve(self, cmd: Reserve) -> None:
        self.cache.reserve(cmd.slots, cmd.max_len)

    def _prefill(self, cmd: Prefill) -> torch.Tensor | None:
        ids, lens = pad(cmd.seqs)
        return self._append(cmd.slots, ids, lens)

    def _decode(self, cmd: Decode) -> torch.Tensor | None:
        ids = torch.tensor(cmd.tokens, dtype=torch.long)[:, None]
        return self._append(cmd.slots, ids, torch.ones(len(cmd.slots), dtype=torch.long))

    def _free(self, cmd: Free) -> None:
        self.cache.free(list(cmd.slots))

    def _logits(self, cmd: Logits) -> torch.Tensor | None:
        return self.full_logits(pad(cmd.seqs)[0])

    def _stats(self, cmd: Stats) -> dict[str, int]:
        counts = self.sync_counts()
        return {"rank": counts["rank"], "kv_cache_bytes": self.cache.nbytes,
                "kv_bytes_per_token": self.cache.bytes_per_token(),
                "tp_collectives": counts["tp_collectives"], "pp_transfers": counts["pp_transfers"]}


class Stepper(SlotSteps):
    """Runs step commands on one rank: its stage's layers, pipeline send/recv, its KV cache."""

    def __init__(self, decoder: Decoder) -> None:
        self.dec = decoder
        self.cache: KVCache = decoder.new_cache()
        m, r = decoder.mapping, decoder.rank
        self.prev, self.next = m.prev_rank(r), m.next_rank(r)
        self.is_leader = r == m.leader
        self.pp_syncs = 0

    def run(self, cmd: Any) -> Any:
        with torch.inference_mode():
            return super().run(cmd)

    # ---- pipeline plumbing -------------------------------------------------------------------
    def _through(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                 cache: KVCache | None) -> torch.Tensor | None:
        """This stage's share of the forward pass; the last stage gets the hidden states back."""
        dev = self.dec.device
        ids, positions = ids.to(dev), positions.to(dev)
        if self.prev is None:
            h = self.dec.embed(ids)
        else:
            h = torch.empty(*ids.shape, self.dec.spec.hidden, dtype=self.dec.dtype, device=dev)
            dist.recv(h, src=self.prev)
            self.pp_syncs += 1
        h = self.dec.layers(h, positions, cache, None if slots is None else slots.to(dev))
        if self.next is not None:
            dist.send(h.contiguous(), dst=self.next)
            return None
        return h

    def _last_logits(self, h: torch.Tensor | None, lens: torch.Tensor) -> torch.Tensor | None:
        if h is None:
            return None
        last = h[torch.arange(h.shape[0]), (lens - 1).to(h.device)][:, None]
        logits = self.dec.head(last)[:, 0]
        return logits.cpu() if self.is_leader else None

    # ---- the forward step ------------------------------------------------------------------------
    def extend(self, slots: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
               start: torch.Tensor) -> torch.Tensor | None:
        positions = start[:, None] + torch.arange(ids.shape[1])
        return self._last_logits(self._through(ids, positions, slots, self.cache), lens)

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor | None:
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        h = self._through(ids, positions, None, None)
        if h is None:
            return None
        logits = self.dec.head(h)
        return logits.cpu() if self.is_leader else None

    def sync_counts(self) -> dict[str, int]:
        return {"rank": self.dec.rank, "tp_collectives": self.dec.sync_count, "pp_transfers": self.pp_syncs}

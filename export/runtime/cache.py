"""KV cache held only for full-attention layers, addressed by slot (one slot per running sequence).

Slots let the engine's driver prefill new sequences, decode a subset and free finished ones
independently: the shape of in-flight batching. No-op and linear layers hold nothing here.
"""

from __future__ import annotations

import torch


class KVCache:
    """k/v per attention layer as [slots, local kv heads, max_len, head_dim], plus per-slot lengths."""

    def __init__(self, kv_heads: dict[int, int], head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", slots: int = 1, max_len: int = 64) -> None:
        self.kv_heads, self.head_dim, self.dtype, self.device = dict(kv_heads), head_dim, dtype, torch.device(device)
        self.slots, self.max_len = 0, 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.reserve(slots, max_len)

    def reserve(self, slots: int, max_len: int) -> None:
        """Grow (never shrink) to hold `slots` sequences of up to `max_len` tokens, keeping contents."""
        slots, max_len = max(slots, self.slots), max(max_len, self.max_len)
        if (slots, max_len) == (self.slots, self.max_len):
            return
        for layer, heads in self.kv_heads.items():
            for store in (self.k, self.v):
                new = torch.zeros(slots, heads, max_len, self.head_dim, dtype=self.dtype, device=self.device)
                if layer in store:
                    old = store[layer]
                    new[:old.shape[0], :, :old.shape[2]] = old
                store[layer] = new
        lengths = torch.zeros(slots, dtype=torch.long)
        lengths[:self.slots] = self.lengths
        self.lengths, self.slots, self.max_len = lengths, slots, max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, T, heads, hd] at `positions` [B, T]; return the slots' keys/values
        [B, heads, L, hd] up to the furthest position written (later positions are masked)."""
        rows = slots[:, None]
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v
        span = int(positions.max()) + 1
        return self.k[layer][slots, :, :span], self.v[layer][slots, :, :span]

    def free(self, slots: list[int]) -> None:
        self.lengths[slots] = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.k, self.v) for t in store.values())

    def bytes_per_token(self) -> int:
        per = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * h * self.head_dim * per for h in self.kv_heads.values())

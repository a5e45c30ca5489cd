"""Tensor/pipeline parallel layout as one value object (after TRT-LLM's `Mapping`)."""

from __future__ import annotations

from dataclasses import dataclass

from export.errors import ExportError


@dataclass(frozen=True)
class Mapping:
    """`rank = pp_rank * tp + tp_rank`, as TRT-LLM numbers its `rank{r}.safetensors` files."""

    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ExportError(f"tp and pp must be >= 1 (got tp={self.tp}, pp={self.pp})")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp

    def ranks(self) -> range:
        return range(self.world_size)

    def pp_layers(self, num_layers: int, pp_rank: int) -> range:
        """Contiguous equal stages; TRT-LLM's runner assumes `num_layers // pp` per stage."""
        if num_layers % self.pp:
            raise ExportError(f"pp={self.pp} does not divide the {num_layers} layers")
        n = num_layers // self.pp
        return range(pp_rank * n, (pp_rank + 1) * n)

    def is_first_stage(self, rank: int) -> bool:
        return self.pp_rank(rank) == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.pp_rank(rank) == self.pp - 1

    def to_trtllm(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp, "pp_size": self.pp}

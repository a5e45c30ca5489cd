"""Tensor/pipeline parallel layout as one value object (after TRT-LLM's `Mapping`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from export.errors import ExportError

EMBEDDING_SHARDS = (None, 0, 1)


@dataclass(frozen=True)
class Mapping:
    """`rank = pp_rank * tp + tp_rank`, as TRT-LLM numbers its `rank{r}.safetensors` files.

    `embedding_shard` is TRT-LLM's `use_parallel_embedding` + `embedding_sharding_dim`: None keeps
    the whole embedding on every tp rank (TRT-LLM's default), 0 splits its vocab rows, 1 its hidden
    columns. It says how one tensor is laid out in the rank files, not where ranks run, so it takes
    no part in equality: a runtime asked for tp=2 pp=1 runs a checkpoint written either way, and
    takes the split from the checkpoint's own mapping (`RankWeights.mapping`).
    """

    tp: int = 1
    pp: int = 1
    embedding_shard: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ExportError(f"tp and pp must be >= 1 (got tp={self.tp}, pp={self.pp})")
        if self.embedding_shard not in EMBEDDING_SHARDS:
            raise ExportError(f"embedding sharding dim must be 0 (vocab) or 1 (hidden), got {self.embedding_shard}")

    @property
    def parallel_embedding(self) -> bool:
        """The embedding is split (and looked up with one more collective): only at tp > 1."""
        return self.embedding_shard is not None and self.tp > 1

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

    def stage_ranks(self, pp_rank: int) -> list[int]:
        """The ranks of stage `pp_rank`, in tp order: one tensor-parallel group."""
        return [self.rank(t, pp_rank) for t in range(self.tp)]

    def tp_group(self, rank: int) -> list[int]:
        """The ranks `rank` all-reduces with (its own stage's)."""
        return self.stage_ranks(self.pp_rank(rank))

    def prev_rank(self, rank: int) -> int | None:
        """The same tp rank of the previous stage, which sends `rank` its hidden states; None on the first."""
        return None if self.is_first_stage(rank) else self.rank(self.tp_rank(rank), self.pp_rank(rank) - 1)

    def next_rank(self, rank: int) -> int | None:
        """The same tp rank of the next stage, which `rank` sends its hidden states to; None on the last."""
        return None if self.is_last_stage(rank) else self.rank(self.tp_rank(rank), self.pp_rank(rank) + 1)

    @property
    def leader(self) -> int:
        """The rank whose logits the driver reads: tp rank 0 of the last stage."""
        return self.rank(0, self.pp - 1)

    def pp_layers(self, num_layers: int, pp_rank: int) -> range:
        """Stage `pp_rank`'s global layer indices, split as TRT-LLM 1.x splits them
        (`tensorrt_llm/mapping.py` `pp_layers`: `torch.tensor_split(torch.arange(num_layers), pp_size)`;
        the C++ runtime's `ModelConfig::getFirstLocalLayer` is the same rule): contiguous stages of
        `num_layers // pp` layers, the first `num_layers % pp` stages one layer more."""
        if not 0 <= pp_rank < self.pp:
            raise ExportError(f"pp rank {pp_rank} is outside pp={self.pp}")
        if self.pp > num_layers:
            raise ExportError(f"pp={self.pp} is more stages than the {num_layers} layers")
        base, extra = divmod(num_layers, self.pp)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (pp_rank < extra))

    def stages(self, num_layers: int) -> list[range]:
        """Every stage's layers, in pipeline order."""
        return [self.pp_layers(num_layers, s) for s in range(self.pp)]

    def is_first_stage(self, rank: int) -> bool:
        return self.pp_rank(rank) == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.pp_rank(rank) == self.pp - 1

    def to_trtllm(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp, "pp_size": self.pp}

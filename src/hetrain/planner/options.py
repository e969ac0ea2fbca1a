"""What the planner's search may choose from, and which kinds and dtypes a search covers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hetrain.cluster.topology import Cluster
from hetrain.errors import PlannerError
from hetrain.plan.types import ScheduleKind

TP_SIZES = (1, 2, 4, 8)
MICRO_BATCH_SIZES = (1, 2, 4, 8)
# Sequence chunks tried on the answer (Plan.seq_chunks): 1 is whole sequences.
SEQ_CHUNKS = (1, 2, 4)


@dataclass(frozen=True)
class SearchOptions:
    micro_batch_sizes: Sequence[int] = MICRO_BATCH_SIZES  # those dividing the global batch
    tp_sizes: Sequence[int] = TP_SIZES
    dtype: str | None = None  # None: each kind's best (bf16 where it has it)
    kinds: Sequence[str] | None = None  # None: all kinds in the cluster
    allow_recompute: bool = True
    shape_budget: int = 20_000  # try every shape when there are at most this many
    max_shapes: int = 8  # distinct templates in one plan
    mixed_tp_per_kind: int = 2  # tp sizes per kind in mixed shapes when not exhaustive
    screen_keep: int = 40  # templates the count program sees when not exhaustive
    program_budget: int = 16  # integer programs per micro-batch size when not exhaustive
    schedule: ScheduleKind = "zero_bubble"
    in_flight_scales: Sequence[float] = (1.0, 1.5)  # zero-bubble: tried per template
    sharded_optimizer: bool = True
    # with a sharded optimizer, partitions are also tried assuming each layer's optimizer state
    # spread over this many holders (kept only where the placed plan then fits)
    optimizer_shards: Sequence[int] = (1, 4)
    # the answer priced again with its micro-batches cut into this many sequence pieces
    # (models whose attention takes pieces: ModelSource.sequence_pieces)
    seq_chunks: Sequence[int] = SEQ_CHUNKS
    # the answer's micro-batch size partitioned again over half layers (ModelSpec.halves),
    # for models whose runtime cuts its blocks so (ModelSource.cuts_half_layers)
    half_layers: bool = False


def model_options(source: ModelLike, **overrides: object) -> SearchOptions:
    """The search options a model allows: the tensor-parallel degrees it splits into, and
    sequence chunks where its attention reads earlier pieces' keys and values, half layers
    where its stages may cut a block between its attention and MLP halves."""
    allowed = {"tp_sizes": source.tp_sizes(),
               "seq_chunks": SEQ_CHUNKS if source.sequence_pieces else (1,),
               "half_layers": source.cuts_half_layers}
    return SearchOptions(**{**allowed, **overrides})  # type: ignore[arg-type]


class ModelLike(Protocol):
    """What model_options reads of a model (model.source.ModelSource)."""

    sequence_pieces: bool
    cuts_half_layers: bool

    def tp_sizes(self) -> tuple[int, ...]: ...


def kind_dtypes(cluster: Cluster, kinds: Sequence[str], dtype: str | None) -> dict[str, str]:
    out = {}
    for k in kinds:
        kind = cluster.kinds[k]
        if dtype is not None and not kind.supports(dtype):
            raise PlannerError(f"{k} does not compute in {dtype}; use one of "
                               f"{', '.join(kind.flops)} or leave --dtype out")
        out[k] = dtype or kind.best_dtype()
    return out


def plan_kinds(cluster: Cluster, options: SearchOptions) -> dict[str, int]:
    counts = cluster.kind_counts()
    if options.kinds is None:
        return counts
    missing = [k for k in options.kinds if k not in counts]
    if missing:
        raise PlannerError(f"kind {missing[0]!r} is not in the cluster "
                           f"(it has {', '.join(counts)})")
    return {k: n for k, n in counts.items() if k in options.kinds}

"""Contiguous layer splits for a chain of stage kinds: even, or balanced by each kind's speed."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from hetrain.cost.model import CostModel
from hetrain.errors import PlannerError


def even_layer_split(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """What a homogeneous tool does: the same number of layers per stage (earlier stages take
    the remainder)."""
    if stages > n_layers:
        raise PlannerError(f"{stages} stages need at least {stages} layers, the model has "
                           f"{n_layers}")
    base, extra = divmod(n_layers, stages)
    out, start = [], 0
    for s in range(stages):
        end = start + base + (s < extra)
        out.append((start, end))
        start = end
    return out


def balanced_layer_split(cost: CostModel, kinds: Sequence[str], samples: int = 1,
                         dtype: str = "fp32", tp: Sequence[int] | None = None
                         ) -> list[tuple[int, int]]:
    """Split the model's layers over stages of `kinds` (in order) so the slowest stage's
    forward+backward time is least: dynamic programming over (stage, first layer)."""
    n, stages = cost.spec.n_layers, len(kinds)
    tps = list(tp or [1] * stages)
    if stages > n:
        raise PlannerError(f"{stages} stages need at least {stages} layers, the model has {n}")
    tokens = samples * cost.spec.seq_len

    def stage_s(s: int, start: int, end: int) -> float:
        return sum(cost.layers_compute_s(kinds[s], (start, end), tokens, op, dtype, tps[s])
                   for op in ("forward", "backward"))

    @cache
    def best(s: int, start: int) -> tuple[float, tuple[int, ...]]:
        if s == stages - 1:
            return stage_s(s, start, n), (n,)
        options = []
        for end in range(start + 1, n - (stages - s - 1) + 1):
            rest, ends = best(s + 1, end)
            options.append((max(stage_s(s, start, end), rest), (end, *ends)))
        return min(options)

    _, ends = best(0, 0)
    starts = (0, *ends[:-1])
    return list(zip(starts, ends, strict=True))

"""Exact gradient combination: every weight's gradient is summed over all stage groups that
hold it. Each micro-batch's loss is already divided by the global token count, so the sum is
the gradient of the global mean loss, however unevenly the samples were spread.

Groups holding a weight with the same tensor-parallel degree sum shard by shard (tp rank j
with tp rank j). Holders with different degrees meet on the full tensor: each rank writes its
shard into zeros (replicated weights divided by the degree), sums, and keeps its shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate

from hetrain.comm.allreduce import HierarchicalAllReduce, all_reduce_tensors
from hetrain.comm.groups import GroupCache
from hetrain.plan.types import Plan


@dataclass(frozen=True)
class SyncSet:
    groups: tuple[str, ...]  # stage groups holding the weights
    tp_index: int | None  # shard-wise: tp rank; None: full-tensor mode (mixed degrees)


class GradSync:
    """Built identically on every rank (group creation order), used by members only."""

    def __init__(self, plan: Plan, rank_of: dict[str, int], kind_of_rank: dict[int, str],
                 backend_of: dict[str, str], cache: GroupCache, n_layers: int, tied: bool):
        self.plan = plan
        tied_last = n_layers - 1 if tied else None
        self.holders = {layer: plan.gradient_holders(layer, tied_last) for layer in range(n_layers)}
        self.reducers: dict[SyncSet, HierarchicalAllReduce] = {}
        for holders in sorted(set(self.holders.values())):
            groups = [plan.group_by_name[g] for g in holders]
            tps = {g.tp for g in groups}
            sets = [(SyncSet(holders, j), [rank_of[g.devices[j]] for g in groups])
                    for j in range(tps.pop())] if len(tps) == 1 else \
                [(SyncSet(holders, None), [rank_of[d] for g in groups for d in g.devices])]
            for key, ranks in sets:
                reducer = HierarchicalAllReduce(tuple(ranks), kind_of_rank, backend_of)
                reducer.build(cache)
                self.reducers[key] = reducer

    def sync(self, params: list[tuple[str, int, torch.nn.Parameter]], tp_index: int,
             tp: int) -> None:
        """Sum the gradients of this rank's (canonical name, layer, parameter) triples."""
        by_set: dict[SyncSet, list[torch.Tensor]] = {}
        full_mode: dict[SyncSet, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        # Sorted by canonical name: every member of a set then flattens the same tensors in
        # the same order into its buckets.
        for _, layer, p in sorted(params, key=lambda item: item[0]):
            holders = self.holders[layer]
            if len(holders) == 1:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            key = SyncSet(holders, tp_index)
            if key in self.reducers:
                by_set.setdefault(key, []).append(_local(p.grad))
            else:
                key = SyncSet(holders, None)
                full_mode.setdefault(key, []).append((p, _embed_full(p.grad, tp)))
        for key in sorted(by_set, key=_order):
            if len(self.reducers[key].ranks) > 1:
                all_reduce_tensors(by_set[key], self.reducers[key])
        for key in sorted(full_mode, key=_order):
            fulls = [f for _, f in full_mode[key]]
            all_reduce_tensors(fulls, self.reducers[key])
            for (p, _), f in zip(full_mode[key], fulls, strict=True):
                _local(p.grad).copy_(_shard_of(f, p.grad))


def _order(key: SyncSet) -> tuple:
    return (key.groups, -1 if key.tp_index is None else key.tp_index)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _slices(t: DTensor) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def _embed_full(grad: torch.Tensor, tp: int) -> torch.Tensor:
    if not isinstance(grad, DTensor):
        return (grad / tp if tp > 1 else grad).clone()
    if all(isinstance(pl, Replicate) for pl in grad.placements):
        return grad.to_local() / tp
    full = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.to_local().device)
    full[_slices(grad)] = grad.to_local()
    return full


def _shard_of(full: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if isinstance(grad, DTensor) and not all(isinstance(p, Replicate) for p in grad.placements):
        return full[_slices(grad)]
    return full

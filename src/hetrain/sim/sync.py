"""Gradient sync sets: the layers whose gradients the same stage groups must sum.

Each layer is summed over the groups that hold it (Plan.holders). Layers with the same holders
travel in one all-reduce, so the set, not the layer, is the unit the simulator times.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrain.cost.model import DTYPE_BYTES, CostModel
from hetrain.plan.types import Plan


@dataclass(frozen=True)
class SyncSet:
    groups: tuple[str, ...]  # stage groups that hold these layers
    layers: tuple[int, ...]
    devices: tuple[str, ...]  # every device of those groups
    nbytes: float  # gradient bytes each device contributes

    def __post_init__(self) -> None:
        if len(self.groups) < 2:
            raise ValueError("a sync set needs at least two holder groups")


def sync_sets(plan: Plan, cost: CostModel) -> list[SyncSet]:
    """One set per distinct holder set of two or more groups, in order of first layer.

    A tensor-parallel device holds 1/tp of its group's weights, so it reduces that shard;
    the largest shard (smallest tp among the holders) bounds the set. Gradients travel in the
    widest dtype among the holders, since a mixed set must agree on one.
    """
    layers_of: dict[tuple[str, ...], list[int]] = {}
    for layer in range(cost.spec.n_layers):
        holders = tuple(g.name for g in plan.holders(layer))
        if len(holders) > 1:
            layers_of.setdefault(holders, []).append(layer)
    groups = plan.group_by_name
    out = []
    for names, layers in layers_of.items():
        members = [groups[n] for n in names]
        params = sum(cost.spec.layers[i].params for i in layers)
        grad_bytes = max(DTYPE_BYTES[g.dtype] for g in members)
        tp = min(g.tp for g in members)
        out.append(SyncSet(groups=names, layers=tuple(layers),
                           devices=tuple(d for g in members for d in g.devices),
                           nbytes=params * grad_bytes / tp))
    return out

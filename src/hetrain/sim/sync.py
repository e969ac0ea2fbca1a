"""Gradient sync sets: the layers whose gradients the same stage groups must sum.

Mirrors runtime/grad_sync.py: each layer is summed over the groups that hold it
(Plan.holders; a tied embedding also over the head's holders), and layers with the same
holders travel in one all-reduce, so the set, not the layer, is what the simulator times.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrain.cost.model import DTYPE_BYTES, CostModel
from hetrain.plan.types import Plan


@dataclass(frozen=True)
class SyncSet:
    groups: tuple[str, ...]  # stage groups that hold these layers, sorted
    layers: tuple[int, ...]
    devices: tuple[str, ...]  # the ranks of one all-reduce
    nbytes: float  # gradient bytes each of those ranks reduces


def sync_sets(plan: Plan, cost: CostModel) -> list[SyncSet]:
    """One set per distinct holder set of two or more groups.

    Holders of one tensor-parallel degree `tp` sum shard by shard: `tp` all-reduces of 1/tp
    of the bytes, one per tp rank, side by side on disjoint devices, so one of them times the
    set. Holders of mixed degrees sum the full tensor over all their devices.
    """
    spec = cost.spec
    tied_last = spec.n_layers - 1 if spec.tie_embeddings else None
    layers_of: dict[tuple[str, ...], list[int]] = {}
    for layer in range(spec.n_layers):
        holders = plan.gradient_holders(layer, tied_last)
        if len(holders) > 1:
            layers_of.setdefault(holders, []).append(layer)
    groups = plan.group_by_name
    out = []
    for names, layers in layers_of.items():
        members = [groups[n] for n in names]
        params = sum(_own_params(cost, i, tied_last) for i in layers)
        nbytes = params * max(DTYPE_BYTES[g.dtype] for g in members)
        tps = {g.tp for g in members}
        if len(tps) == 1:
            tp = tps.pop()
            devices, nbytes = tuple(g.devices[0] for g in members), nbytes / tp
        else:
            devices = tuple(d for g in members for d in g.devices)
        out.append(SyncSet(groups=names, layers=tuple(layers), devices=devices, nbytes=nbytes))
    return out


def _own_params(cost: CostModel, layer: int, tied_last: int | None) -> float:
    """Parameters whose gradient this layer's holders sum: a tied head's output weight is the
    embedding's, summed with layer 0."""
    params = cost.spec.layers[layer].params
    if layer == tied_last:
        params -= cost.spec.vocab_size * cost.spec.dim
    return params


def runtime_order(plan: Plan, sync: SyncSet) -> tuple[bool, tuple[str, ...]]:
    """Sort key of the order runtime.grad_sync sums a rank's sets in, one blocking collective
    after another: shard-wise sets first, then those whose holders differ in TP degree (full
    tensors), each by holder names."""
    groups = plan.group_by_name
    return len({groups[g].tp for g in sync.groups}) > 1, sync.groups


def syncs_in_order(plan: Plan, syncs: list[SyncSet]) -> dict[str, list[int]]:
    """Per stage group, the indices of its sets in `syncs`, in runtime order."""
    out: dict[str, list[int]] = {g.name: [] for g in plan.stage_groups}
    for i in sorted(range(len(syncs)), key=lambda i: runtime_order(plan, syncs[i])):
        for g in syncs[i].groups:
            out[g].append(i)
    return out

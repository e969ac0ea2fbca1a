"""The rank pairs that exchange activations and gradients under a plan: each pair of
neighbouring stage groups on a route, receiver rank j taking from sender rank j mod (the
sender's size), in both directions (Worker._peer_ranks)."""

from __future__ import annotations

from hetrain.plan.types import Plan


def transfer_pairs(plan: Plan, rank_of: dict[str, int]) -> list[tuple[int, int]]:
    """(sender, receiver) ranks of every pipeline transfer, in one order on every rank."""
    pairs: list[tuple[int, int]] = []
    for route in plan.routes:
        for a, b in zip(route.stages, route.stages[1:], strict=False):
            ga, gb = plan.group_by_name[a], plan.group_by_name[b]
            for src, dst in ((ga, gb), (gb, ga)):
                pairs += [(rank_of[src.devices[j % src.tp]], rank_of[dst.devices[j]])
                          for j in range(dst.tp)]
    return pairs

"""Emulated kinds: CPU processes whose compute is stretched to the kind's speed.

Each compute action runs for real (so results stay exact), then sleeps until the duration the
cost model gives that kind for it, times a `time_scale` that makes the fastest emulated kind
comfortably slower than the real CPU work, even with several workers per core. The ratios
between kinds are thus those of the catalog (or the profile)."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from hetrain.cluster.discovery import present_kinds
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.plan.types import Plan


def emulated_kinds(plan: Plan, cluster: Cluster) -> set[str]:
    """Kinds of the plan with too few real devices here (cpu is real on any machine)."""
    present = present_kinds()
    need: dict[str, int] = {}
    for g in plan.stage_groups:
        need[g.kind] = need.get(g.kind, 0) + g.tp
    return {k for k, n in need.items() if len(present.get(k, [])) < n}


def cpu_seconds_per_sample(stage_fn, tokens: torch.Tensor, targets: torch.Tensor,
                           repeats: int = 3) -> float:
    """Real fwd+bwd CPU time per sample of a model on one thread (best of `repeats`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = stage_fn(tokens)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            best = min(best, time.perf_counter() - t0)
        return best / tokens.shape[0]
    finally:
        torch.set_num_threads(threads)


def auto_time_scale(plan: Plan, cost: CostModel, cpu_s_per_sample: float, workers: int) -> float:
    """Stretch so the fastest kind's emulated work is `safety` times the real CPU work."""
    spec = cost.spec
    fastest = min(
        sum(cost.layers_compute_s(g.kind, (0, spec.n_layers), spec.seq_len, op, g.dtype)
            for op in ("forward", "backward"))
        for g in plan.stage_groups
    )
    cores = os.cpu_count() or 1
    safety = 2.5 * max(1.0, workers / cores)
    return safety * cpu_s_per_sample / fastest


class Pacer:
    """Sleeps out the rest of an emulated action; real kinds are not paced."""

    def __init__(self, emulated: bool, time_scale: float):
        self.emulated = emulated
        self.time_scale = time_scale
        self.late_s = 0.0  # real work that overran the emulated duration

    def finish(self, start: float, emulated_s: float) -> None:
        if not self.emulated:
            return
        remaining = start + emulated_s * self.time_scale - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        else:
            self.late_s -= remaining

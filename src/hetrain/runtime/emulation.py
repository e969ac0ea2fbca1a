"""Emulated kinds: CPU processes whose compute is stretched to the kind's speed.

Each compute action runs for real (so results stay exact), then sleeps until the duration the
cost model gives that kind for it, times one `time_scale`. Without a real kind in the job, the
scale makes the fastest emulated kind comfortably slower than the real CPU work, even with
several workers per core; with one, the scale is the real kind's measured seconds over its
cost-model seconds, so emulated kinds keep the catalog's ratio to the real kind's speed. Real
kinds are never paced."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from hetrain.cluster import devices as device_layer
from hetrain.cluster.discovery import real_kind_devices
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.plan.types import Plan


def real_devices_by_kind(plan: Plan, cluster: Cluster) -> dict[str, list[str]]:
    """Kinds of the plan that run real here -> the torch devices their processes bind to.
    Raises ClusterError (one line, before any worker starts) for a `mode: real` kind whose
    plugin, backend or devices are missing."""
    need: dict[str, int] = {}
    for g in plan.stage_groups:
        need[g.kind] = need.get(g.kind, 0) + g.tp
    return real_kind_devices(cluster.kinds, need)


def emulated_kinds(plan: Plan, cluster: Cluster) -> set[str]:
    """Kinds of the plan that run emulated: absent here, or declared `mode: emulated`."""
    return set(plan.kinds()) - set(real_devices_by_kind(plan, cluster))


def seconds_per_sample(stage_fn, tokens: torch.Tensor, targets: torch.Tensor,
                       device: str = "cpu", repeats: int = 3) -> float:
    """Real fwd+bwd time per sample of a model on `device`, one CPU thread (best of
    `repeats`, after one warm-up pass)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokens, targets = tokens.to(device), targets.to(device)
    try:
        best = float("inf")
        for i in range(repeats + 1):
            device_layer.synchronize(device)
            t0 = time.perf_counter()
            logits = stage_fn(tokens)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            device_layer.synchronize(device)
            if i > 0 or device == "cpu":
                best = min(best, time.perf_counter() - t0)
        return best / tokens.shape[0]
    finally:
        torch.set_num_threads(threads)


def cpu_seconds_per_sample(stage_fn, tokens: torch.Tensor, targets: torch.Tensor,
                           repeats: int = 3) -> float:
    """Real fwd+bwd CPU time per sample of a model on one thread (best of `repeats`)."""
    return seconds_per_sample(stage_fn, tokens, targets, "cpu", repeats)


def model_seconds_per_sample(plan: Plan, cost: CostModel, kind: str, dtype: str) -> float:
    """The cost model's fwd+bwd seconds of one sample through every layer on `kind`."""
    spec = cost.spec
    return sum(cost.layers_compute_s(kind, (0, spec.n_layers), spec.seq_len, op, dtype)
               for op in ("forward", "backward"))


def anchored_time_scale(plan: Plan, cost: CostModel, real_kind: str,
                        real_s_per_sample: float) -> float:
    """Stretch that maps the cost model's seconds to wall seconds as the real kind measures
    them, so emulated kinds run at the catalog's ratio to the real kind's measured speed."""
    dtype = next(g.dtype for g in plan.stage_groups if g.kind == real_kind)
    return real_s_per_sample / model_seconds_per_sample(plan, cost, real_kind, dtype)


def auto_time_scale(plan: Plan, cost: CostModel, cpu_s_per_sample: float, workers: int) -> float:
    """Stretch so the fastest kind's emulated work is `safety` times the real CPU work."""
    fastest = min(model_seconds_per_sample(plan, cost, g.kind, g.dtype)
                  for g in plan.stage_groups)
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

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
    `repeats`, after one warm-up pass). On the CPU, CPU seconds, not wall-clock: a busy
    machine stretches the wall-clock time of the work, and auto_time_scale allows for that
    from the load average, once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokens, targets = tokens.to(device), targets.to(device)
    try:
        best = float("inf")
        clock = time.process_time if device == "cpu" else time.perf_counter
        for i in range(repeats + 1):
            device_layer.synchronize(device)
            t0 = clock()
            logits = stage_fn(tokens)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            device_layer.synchronize(device)
            if i > 0 or device == "cpu":
                best = min(best, clock() - t0)
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


def machine_load() -> float:
    """Processes running or waiting for a core on this machine (1-minute load average)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


def auto_time_scale(plan: Plan, cost: CostModel, cpu_s_per_sample: float, workers: int,
                    load: float | None = None) -> float:
    """Stretch so the fastest kind's emulated work is `safety` times the real CPU work, where
    the real work runs slower by the share of a core each worker gets: the run's workers and
    the machine's other `load` (default: its load average) share the cores. Without that
    share, a busy machine overruns the emulated durations and every figure reads its load."""
    fastest = min(model_seconds_per_sample(plan, cost, g.kind, g.dtype)
                  for g in plan.stage_groups)
    cores = os.cpu_count() or 1
    others = machine_load() if load is None else load
    safety = 2.5 * max(1.0, (workers + others) / cores)
    return safety * cpu_s_per_sample / fastest


class Pacer:
    """Sleeps out the rest of an emulated action; real kinds are not paced.

    Actions that follow one another back to back (no wait between) are paced on one timeline
    at the kind's speed: an action that ran late, say a time slice lost to another process on
    a busy machine, is made up from the slack of the next ones. After a wait (a receive, a
    collective, the optimizer) the timeline starts afresh, so nothing real is hidden."""

    BACK_TO_BACK_S = 1e-3  # a gap shorter than this between two actions is not a wait

    def __init__(self, emulated: bool, time_scale: float, clock=time.perf_counter,
                 sleep=time.sleep):
        self.emulated = emulated
        self.time_scale = time_scale
        self._clock, self._sleep = clock, sleep
        self._late_s = 0.0  # closed timelines: how far their end ran past the modelled end
        self._model_end: float | None = None  # the current timeline's modelled end
        self._real_end: float | None = None

    @property
    def late_s(self) -> float:
        """Real work that overran the emulated durations and was not made up."""
        open_late = 0.0 if self._real_end is None else max(0.0, self._real_end - self._model_end)
        return self._late_s + open_late

    def finish(self, start: float, emulated_s: float) -> None:
        if not self.emulated:
            return
        back_to_back = self._real_end is not None and \
            start - self._real_end < self.BACK_TO_BACK_S
        if back_to_back:
            model_start = self._model_end
        else:
            self._late_s = self.late_s  # the previous timeline closes
            model_start = start
        target = model_start + emulated_s * self.time_scale
        remaining = target - self._clock()
        if remaining > 0:
            self._sleep(remaining)
        self._model_end, self._real_end = target, self._clock()

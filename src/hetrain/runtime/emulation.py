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
    """Real fwd+bwd CPU time per sample of a model on one thread (best of `repeats`). CPU
    seconds, not wall-clock: a busy machine stretches the wall-clock time of the work, and
    auto_time_scale allows for that from the load average, once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            logits = stage_fn(tokens)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            best = min(best, time.process_time() - t0)
        return best / tokens.shape[0]
    finally:
        torch.set_num_threads(threads)


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
    spec = cost.spec
    fastest = min(
        sum(cost.layers_compute_s(g.kind, (0, spec.n_layers), spec.seq_len, op, g.dtype)
            for op in ("forward", "backward"))
        for g in plan.stage_groups
    )
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

"""Emulated pacing: durations on the kind's timeline, late work made up back to back only, and
a time scale that leaves room for the machine's load."""

from __future__ import annotations

import os

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.runtime.emulation import Pacer, auto_time_scale


class FakeClock:
    """A clock that real work (`work`) and the pacer's sleeps advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def run_action(pacer: Pacer, clock: FakeClock, real_s: float, emulated_s: float,
               wait_s: float = 0.0) -> float:
    clock.now += wait_s
    start = clock.now
    clock.now += real_s
    pacer.finish(start, emulated_s)
    return clock.now


def test_back_to_back_actions_make_up_a_late_one():
    clock = FakeClock()
    pacer = Pacer(True, 2.0, clock=clock, sleep=clock.sleep)
    # 1 s emulated x 2 = 2 s each; the first real work overran to 3 s.
    assert run_action(pacer, clock, 3.0, 1.0) == 3.0
    assert pacer.late_s == pytest.approx(1.0)
    # The next one starts at 2 s on the kind's timeline: it ends at 4 s, the lateness made up.
    assert run_action(pacer, clock, 0.5, 1.0) == pytest.approx(4.0)
    assert pacer.late_s == pytest.approx(0.0)


def test_after_a_wait_the_timeline_starts_afresh():
    clock = FakeClock()
    pacer = Pacer(True, 2.0, clock=clock, sleep=clock.sleep)
    run_action(pacer, clock, 3.0, 1.0)  # 1 s late
    # A receive waited 0.5 s: the next action is paced from its own start, the late second
    # stays on the books.
    assert run_action(pacer, clock, 0.5, 1.0, wait_s=0.5) == pytest.approx(5.5)
    assert pacer.late_s == pytest.approx(1.0)
    assert run_action(pacer, clock, 5.0, 1.0, wait_s=1.0) == pytest.approx(11.5)
    assert pacer.late_s == pytest.approx(4.0)


def test_real_kinds_are_not_paced():
    clock = FakeClock()
    pacer = Pacer(False, 2.0, clock=clock, sleep=clock.sleep)
    assert run_action(pacer, clock, 0.1, 1.0) == pytest.approx(0.1)
    assert pacer.late_s == 0.0


def test_a_busy_machine_gets_a_longer_time_scale():
    cluster = cluster_from_dict({"nodes": [{"name": "h", "kind": "H100", "count": 1},
                                           {"name": "a", "kind": "A100-80GB", "count": 1}]})
    cost = CostModel(cluster, model_spec(model_config("tiny"), 64))
    plan = data_parallel_plan(cluster, cost, 16)
    idle = auto_time_scale(plan, cost, 1e-3, workers=2, load=0.0)
    # Eight other processes per core: each worker gets about an eighth of a core.
    busy = auto_time_scale(plan, cost, 1e-3, workers=2, load=8.0 * (os.cpu_count() or 1))
    assert busy > 4 * idle


def test_the_benches_calibrate_from_the_plans_model():
    # The benches give no model object: the plan's is loaded (they crashed without it).
    from hetrain.data.loading import load_corpus
    from hetrain.runtime.config import TrainConfig
    from hetrain.runtime.launch import calibrate_time_scale

    cluster = cluster_from_dict({"nodes": [{"name": "h", "kind": "H100", "count": 1},
                                           {"name": "a", "kind": "A100-80GB", "count": 1}]})
    cost = CostModel(cluster, model_spec(model_config("tiny"), 16))
    plan = data_parallel_plan(cluster, cost, 4)
    config = TrainConfig(model="tiny", steps=1)
    assert calibrate_time_scale(plan, cost, load_corpus(None, 0), config) > 0

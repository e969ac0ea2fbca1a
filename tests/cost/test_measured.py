"""MeasuredCost: fits of measured figures and the lookups the simulator makes."""

from __future__ import annotations

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost.measured import (
    MeasuredCost,
    MeasuredFigures,
    allreduce_phases,
    fit_linear,
    fit_trimmed,
    trimmed_mean,
)
from hetrain.errors import CostError
from hetrain.model import model_config, model_spec
from hetrain.plan import StageGroup


@pytest.fixture
def cluster():
    return cluster_from_dict({"name": "m", "nodes": [{"name": "h", "kind": "H100", "count": 2},
                                                     {"name": "a", "kind": "A100-80GB",
                                                      "count": 2}]})


def _group(kind="H100", layers=(0, 3), devices=("h:0",)):
    return StageGroup(name="g", kind=kind, devices=list(devices), layers=layers)


def test_fit_linear_recovers_latency_and_bandwidth():
    xs = [1e3, 1e4, 1e5, 1e6]
    fit = fit_linear(xs, [2e-4 + x * 1e-9 for x in xs])
    assert fit.fixed == pytest.approx(2e-4)
    assert fit.slope == pytest.approx(1e-9)


def test_fit_linear_is_the_median_when_size_does_not_explain_time():
    assert fit_linear([5.0, 5.0, 5.0], [1.0, 3.0, 2.0]).fixed == 2.0
    falling = fit_linear([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert (falling.fixed, falling.slope) == (2.0, 0.0)


def test_a_stall_bends_neither_the_fit_nor_the_trimmed_mean():
    pairs = [(1.0, 1.0)] * 9 + [(1.0, 100.0)] + [(2.0, 2.0)] * 5
    fit = fit_trimmed(pairs)
    assert fit(1.0) == pytest.approx(1.0) and fit(2.0) == pytest.approx(2.0)
    assert trimmed_mean([1.0] * 9 + [50.0]) == pytest.approx(1.0)


def test_allreduce_phases_follow_the_hierarchical_sum():
    assert allreduce_phases(["H100"]) == 0
    assert allreduce_phases(["H100", "H100", "H100"]) == 1  # one native all-reduce
    assert allreduce_phases(["H100", "A100"]) == 1  # leaders only: the bridge
    assert allreduce_phases(["H100", "H100", "A100"]) == 3  # reduce, bridge, broadcast


def test_stage_times_are_looked_up_and_scaled_to_unmeasured_sizes(cluster):
    spec = model_spec(model_config("tiny"), 64)
    # keyed by the tokens of one action: 2 samples of 64 tokens
    figures = MeasuredFigures(compute_s={
        ("H100", (0, 3), 1, "forward", False): {128: [0.1, 0.1, 0.4]},
        # units 0-3 in half layers: the embedding and block 0 (both halves), other layers
        ("H100", (0, 3), 1, "forward", True): {128: [0.3, 0.3, 0.3]}})
    cost = MeasuredCost(cluster, spec, figures)
    assert cost.stage_compute_s(_group(), "forward", 2, 64) == pytest.approx(0.2)
    # a plan in half layers is priced by the cost in its units (plan.schedule.in_plan_units)
    assert cost.units(True).stage_compute_s(_group(), "forward", 2, 64) == pytest.approx(0.3)
    assert cost.stage_compute_s(_group(), "forward", 4, 64) == pytest.approx(0.4)
    # a piece of 32 tokens of each of the 2 samples (sequence chunks): half the tokens
    assert cost.stage_compute_s(_group(), "forward", 2, 32) == pytest.approx(0.1)
    with pytest.raises(CostError, match="no measured backward"):
        cost.stage_compute_s(_group(), "backward", 2, 64)
    with pytest.raises(CostError, match="no measured forward for A100"):
        cost.stage_compute_s(_group("A100-80GB", devices=("a:0",)), "forward", 2, 64)


def test_communication_comes_from_the_fits(cluster):
    spec = model_spec(model_config("tiny"), 64)
    figures = MeasuredFigures(p2p=[(1e4, 1e-3), (1e4, 1e-3)], late_recv=[(1e4, 3e-3)],
                              allreduce=[(3, 1e6, 6e-3), (1, 1e6, 2e-3)],
                              optimizer={"H100": [(1e6, 4e-3), (2e6, 8e-3)]})
    cost = MeasuredCost(cluster, spec, figures)
    assert cost.p2p_s("h:0", "a:0", 1e4) == pytest.approx(1e-3)
    assert cost.p2p_handshake_s("h:0", "a:0") == pytest.approx(2e-3)
    assert cost.sync_s(["h:0", "h:1", "a:0"], 1e6) == pytest.approx(6e-3)
    assert cost.sync_s(["h:0", "h:1"], 1e6) == pytest.approx(2e-3)
    assert cost.optimizer_s("H100", 3e6) == pytest.approx(12e-3)
    # a kind whose optimizer was not measured takes the others'
    assert cost.optimizer_s("A100-80GB", 3e6) == pytest.approx(12e-3)
    assert set(cost.summary()) >= {"p2p", "p2p_handshake_s", "allreduce_phase", "optimizer",
                                   "stage_compute_s"}

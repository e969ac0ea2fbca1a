"""The partition DP finds the least slowest stage of every cut of the layers, memory included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.cost.model import PLAIN, RECOMPUTE, REGATHER
from hetrain.cost.tables import TableCache
from hetrain.model import model_config, model_spec
from hetrain.planner.links import BoundaryComm, LinkModel
from hetrain.planner.partition import LayerBound, Partitioner, ScaledSlots
from tests.planner.brute import brute_partition

# Two made-up kinds with little memory, so that stages need recomputation or do not fit.
CLUSTER = cluster_from_dict({
    "kinds": [
        {"name": "fast", "vendor": "x", "backend": "gloo", "flops": {"bf16": 4e12},
         "memory_gib": 0.05, "memory_bandwidth_gbps": 500, "intra_node_gbps": 50},
        {"name": "slow", "vendor": "y", "backend": "gloo", "flops": {"bf16": 1e12},
         "memory_gib": 0.09, "memory_bandwidth_gbps": 200, "intra_node_gbps": 10},
    ],
    "nodes": [{"name": "f", "kind": "fast", "count": 4}, {"name": "s", "kind": "slow", "count": 2}],
})
SPEC = model_spec(model_config("small"), 512)
COST = CostModel(CLUSTER, SPEC)
DTYPES = {"fast": "bf16", "slow": "bf16"}
TABLES = TableCache(COST)

block = st.tuples(st.sampled_from(["fast", "slow"]), st.sampled_from([1, 2]),
                  st.integers(1, 3), st.booleans())


def partitioner(mbs, allow_recompute=True):
    comm = BoundaryComm(COST, LinkModel(CLUSTER), DTYPES, mbs)
    return Partitioner(TABLES, DTYPES, mbs, comm, allow_recompute), comm


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=1, max_size=3), mbs=st.sampled_from([1, 2]),
       allow_recompute=st.booleans())
def test_dp_matches_every_cut(blocks, mbs, allow_recompute):
    blocks = tuple((k, tp, c, local) for k, tp, c, local in blocks)
    part, comm = partitioner(mbs, allow_recompute)
    stages = [(k, tp, local) for k, tp, c, local in blocks for _ in range(c)]
    want = brute_partition(COST, comm, DTYPES, mbs, stages, allow_recompute)
    got = part.slot_s(blocks)
    if math.isinf(want):
        assert math.isinf(got) and part.best(blocks) is None
        return
    assert got == pytest.approx(want, rel=1e-12)
    best = part.best(blocks)
    assert best.slot_s == pytest.approx(got, rel=1e-12)
    assert best.layers[0][0] == 0 and best.layers[-1][1] == SPEC.n_layers
    assert all(a < b for a, b in best.layers)
    assert all(x[1] == y[0] for x, y in zip(best.layers, best.layers[1:], strict=False))
    if not allow_recompute:
        assert RECOMPUTE not in best.modes


def test_recomputation_only_where_needed():
    part, _ = partitioner(2)
    best = part.best((("fast", 1, 3, True), ("slow", 1, 2, True)))
    assert best is not None and RECOMPUTE in best.modes  # the fast kind's 0.05 GiB is tight
    without, _ = partitioner(2, allow_recompute=False)
    assert without.slot_s((("fast", 1, 3, True), ("slow", 1, 2, True))) >= best.slot_s


def test_regathering_before_recomputation_under_sequence_parallelism():
    # TP-2 stages split their sequence: a stage that does not fit plain first keeps its
    # gathered inputs as shards (cheaper than recomputing) where that is enough.
    part, _ = partitioner(1)
    best = part.best((("fast", 2, 1, True), ("slow", 2, 1, True)))
    assert best is not None and best.modes == (REGATHER, PLAIN)
    no_sp = partitioner(1)[0].best((("fast", 1, 2, True), ("slow", 1, 2, True)))
    assert REGATHER not in no_sp.modes  # tp 1: nothing to gather


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines=st.lists(st.lists(block, min_size=1, max_size=3), min_size=2, max_size=5),
       mbs=st.sampled_from([1, 2]), split=st.integers(0, 5))
def test_many_pipelines_at_once_match_one_at_a_time(pipelines, mbs, split):
    """solve_many shares suffixes between pipelines and computes only the starts each needs;
    in two calls, the second may need starts the first left out."""
    pipelines = [tuple(p) for p in pipelines]
    together, _ = partitioner(mbs)
    together.solve_many(pipelines[split:])
    together.solve_many(pipelines)
    for blocks in pipelines:
        alone, _ = partitioner(mbs)
        assert together.slot_s(blocks) == alone.slot_s(blocks)
        assert together.best(blocks) == alone.best(blocks)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=1, max_size=3), sizes=st.sampled_from([(1, 2), (1, 4),
                                                                               (2, 4)]))
def test_scaled_slots_bound_the_larger_micro_batch(blocks, sizes):
    blocks = tuple(blocks)
    smaller, _ = partitioner(sizes[0])
    larger, _ = partitioner(sizes[1])
    bound = ScaledSlots(smaller, larger, {"fast": [1, 2], "slow": [1, 2]})
    exact = larger.slot_s(blocks)
    assert bound.slot_s(blocks) <= exact  # not partitioned at the smaller: LayerBound's
    smaller.slot_s(blocks)
    assert bound.slot_s(blocks) <= exact
    # never below the smaller size's own slot (times grow with the micro-batch)
    assert bound.slot_s(blocks) >= smaller.slot_s(blocks) * (1 - 1e-8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=1, max_size=4), mbs=st.sampled_from([1, 2, 4]),
       allow_recompute=st.booleans())
def test_layer_bound_never_above_the_partition(blocks, mbs, allow_recompute):
    """The bound that spares a micro-batch size its partitions: at most the exact slot, and
    infinite only where no partition fits."""
    blocks = tuple(blocks)
    part, _ = partitioner(mbs, allow_recompute)
    bound = LayerBound(part, {"fast": [1], "slow": [2]}).slot_s(blocks)
    exact = part.slot_s(blocks)
    assert bound <= exact
    if math.isinf(bound):
        assert math.isinf(exact)


def test_layer_bound_is_close_on_a_deep_model():
    """Tight enough to be worth having: within 15 % of the exact slot of pipelines of a
    32-layer model on roomy devices (waits and uneven layers are what it leaves out)."""
    cluster = cluster_from_dict({
        "kinds": [{"name": "big", "vendor": "x", "backend": "gloo", "flops": {"bf16": 1e14},
                   "memory_gib": 80, "memory_bandwidth_gbps": 2000, "intra_node_gbps": 300}],
        "nodes": [{"name": "n", "kind": "big", "count": 8}],
    })
    cost = CostModel(cluster, model_spec(model_config("llama-7b"), 2048))
    comm = BoundaryComm(cost, LinkModel(cluster), {"big": "bf16"}, 1)
    part = Partitioner(TableCache(cost), {"big": "bf16"}, 1, comm)
    bound = LayerBound(part, {"big": [1, 2]})
    for blocks in [(("big", 1, 4, True),), (("big", 2, 3, True),),
                   (("big", 1, 2, True), ("big", 2, 3, True))]:
        exact = part.slot_s(blocks)
        assert 0.85 * exact <= bound.slot_s(blocks) <= exact


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_least_fitting_is_the_least_cost_among_entries_that_fit(rows, width, seed):
    """LayerBound's array form: per in-flight count f and row, the least cost among the
    row's entries holding f or more (inf where none), as a loop over entries gives it."""
    from hetrain.planner.partition import NO_LIMIT, _least_fitting

    rng = np.random.default_rng(seed)
    cost = np.where(rng.random((rows, width)) < 0.2, np.inf, rng.random((rows, width)))
    fits = rng.choice([-1, 0, 1, 2, 3, 5, NO_LIMIT], size=(rows, width)).astype(float)
    flights = np.arange(5)
    got = _least_fitting(cost, fits, flights)
    for f in flights:
        for r in range(rows):
            want = min((c for c, k in zip(cost[r], fits[r], strict=True) if k >= f),
                       default=np.inf)
            assert got[f, r] == want

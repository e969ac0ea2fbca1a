"""The search: exact against brute force on small clusters, valid plans, more devices never
slower, and a reason when nothing fits."""

from __future__ import annotations

import itertools

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.cost.tables import TableCache
from hetrain.errors import PlanError, PlannerError
from hetrain.model import model_config, model_spec
from hetrain.planner.report import checked_memory_bytes
from hetrain.planner.search import SearchOptions, build_candidates, search_plan
from tests.planner.brute import brute_counts


def cluster(*nodes, **links):
    """Nodes as (kind, count) or (kind, count, replicas)."""
    raw = [{"name": f"n{i}", "kind": n[0], "count": n[1], "replicas": n[2] if len(n) > 2 else 1}
           for i, n in enumerate(nodes)]
    return cluster_from_dict({"nodes": raw, "links": links} if links else {"nodes": raw})


FAST = {"inter_node_gbps": 400, "bridge_gbps": 400, "inter_node_latency_us": 1}
# Each kind in one node, or one device per node: the planner's link model is then exactly
# what the placed plan gets, so the estimate of the plan equals the search's objective.
SMALL = {
    "three-kinds": cluster(("H100", 1), ("BR104", 1), ("A100-80GB", 1)),
    "2xH100+2xA100": cluster(("H100", 2), ("A100-80GB", 2)),
    "4xH100": cluster(("H100", 4)),
    "1+1+1 nodes": cluster(("H100", 1, 3), ("Ascend910B", 1)),
    "3 kinds x2": cluster(("H100", 2), ("BR104", 2), ("A100-80GB", 2)),
    "8 devices": cluster(("H100", 4), ("BR104", 2), ("A100-80GB", 2)),
    # fast links make data parallelism across kinds pay: optima of two and three templates
    "fast 2H+2A": cluster(("H100", 2), ("A100-80GB", 2), **FAST),
    "fast 3H+1B": cluster(("H100", 3), ("BR104", 1), **FAST),
    "fast 1+1+1 nodes": cluster(("H100", 1, 2), ("A100-80GB", 1, 2), ("BR104", 1), **FAST),
}
CASES = [(name, "llama-7b", 1024, 16) for name in SMALL if name != "8 devices"] + [
    ("fast 2H+2A", "small", 512, 64), ("fast 3H+1B", "small", 512, 64),
    ("fast 1+1+1 nodes", "small", 512, 64), ("fast 1+1+1 nodes", "llama-7b", 1024, 32),
    ("8 devices", "llama-13b", 512, 8), ("three-kinds", "small", 512, 32),
    ("2xH100+2xA100", "small", 512, 32), ("1+1+1 nodes", "small", 512, 32),
    ("three-kinds", "llama-7b", 2048, 8), ("3 kinds x2", "llama-13b", 512, 8),
    ("4xH100", "llama-13b", 1024, 12)]


def brute_best(clus, cost, global_batch, options):
    tables = TableCache(cost)
    best = float("inf")
    for mbs in options.micro_batch_sizes:
        if global_batch % mbs:
            continue
        cands = build_candidates(clus, cost, tables, global_batch, mbs, options)
        assert cands.exhaustive
        if cands.templates:
            best = min(best, brute_counts(clus, cands.templates, cands.micro_batches,
                                          cands.max_shapes))
    return best


@pytest.mark.parametrize("name,model,seq_len,global_batch", CASES)
def test_search_is_exact_on_small_clusters(name, model, seq_len, global_batch):
    clus = SMALL[name]
    cost = CostModel(clus, model_spec(model_config(model), seq_len))
    # brute force enumerates the partitions of one memory assumption: the unsharded one
    options = SearchOptions(optimizer_shards=(1,))
    want = brute_best(clus, cost, global_batch, options)
    try:
        result = search_plan(clus, cost, global_batch, options)
    except PlannerError:
        assert want == float("inf")
        return
    assert result.exhaustive
    assert result.solution.step_s == pytest.approx(want, rel=1e-9)
    # the returned plan's price (the shared schedule's run and the sync definition) is near
    # or below the closed forms' optimum (fill + m slots + tail), and the plan runs
    assert result.estimate.step_s <= result.solution.step_s * 1.05
    assert result.plan.predicted["step_s"] == result.estimate.step_s
    checked_memory_bytes(result.plan, cost)


GROWTH = [
    (cluster(("H100", 1)), cluster(("H100", 2))),
    (cluster(("H100", 2)), cluster(("H100", 2), ("A100-80GB", 1))),
    (cluster(("A100-80GB", 2), ("BR104", 1)), cluster(("A100-80GB", 3), ("BR104", 1))),
    (cluster(("H100", 1), ("BR104", 1)), cluster(("H100", 1), ("BR104", 1), ("Ascend910B", 2))),
    (cluster(("BR104", 1, 2)), cluster(("BR104", 1, 4))),
]


@pytest.mark.parametrize("small,large", GROWTH)
@pytest.mark.parametrize("model,seq_len", [("llama-7b", 2048), ("small", 512)])
def test_more_devices_never_slower(small, large, model, seq_len):
    spec = model_spec(model_config(model), seq_len)
    try:
        a = search_plan(small, CostModel(small, spec), 16).estimate.step_s
    except PlannerError:
        a = float("inf")  # does not fit on the smaller cluster
    b = search_plan(large, CostModel(large, spec), 16)
    assert b.estimate.step_s <= a * (1 + 1e-9)


def test_single_kind_restriction(three_kinds):
    cost = CostModel(three_kinds, model_spec(model_config("small"), 256))
    result = search_plan(three_kinds, cost, 8, SearchOptions(kinds=("BR104",)))
    assert result.plan.kinds() == ["BR104"]
    with pytest.raises(PlannerError, match="not in the cluster"):
        search_plan(three_kinds, cost, 8, SearchOptions(kinds=("V100",)))


def test_infeasible_names_the_shortfall(three_kinds):
    cost = CostModel(three_kinds, model_spec(model_config("llama-70b"), 4096))
    with pytest.raises(PlannerError, match=r"needs \d+ GiB for weights and optimizer states, "
                                           r"the cluster has \d+ GiB"):
        search_plan(three_kinds, cost, 8)


def test_infeasible_activations(three_kinds):
    # the states fit, but 4096-token activations of llama-7b at micro-batch 8 do not
    cost = CostModel(three_kinds, model_spec(model_config("llama-7b"), 4096))
    with pytest.raises(PlannerError, match="activations"):
        search_plan(three_kinds, cost, 8, SearchOptions(micro_batch_sizes=(8,),
                                                        allow_recompute=False))


def test_mixed_shapes_try_each_kind_first():
    """Large clusters: shapes of every subset of kinds in the default order, and the shape of
    all kinds with each kind moved to the front (the first stage idles through the warm-up,
    so the roomiest kind is not always the best one there)."""
    from hetrain.planner.templates import kind_orders, proportional_shapes, tp_combination

    kinds = ("H800", "Ascend910B", "MLU370", "BR104")
    orders = kind_orders(kinds)
    assert orders[0] == kinds and len(orders) == 4
    assert {o[0] for o in orders} == set(kinds)
    assert all(sorted(o) == sorted(kinds) for o in orders)
    counts = {k: 32 for k in kinds}
    tps = {k: [8, 4] for k in kinds}
    shapes = list(proportional_shapes(counts, tps, 82, orders))
    assert len(shapes) == len(set(shapes))  # each once
    full = [tuple(b.kind for b in s) for s in shapes if len(s) == 4]
    assert set(full) == set(orders)
    # all kinds: every TP combination; fewer kinds: each kind's first (most efficient) TP
    assert {tuple(b.tp for b in s) for s in shapes if len(s) == 4} == set(
        itertools.product([8, 4], repeat=4))
    assert {b.tp for s in shapes if len(s) < 4 for b in s} == {8}
    # fewer kinds: only in the default order
    pairs = {tuple(b.kind for b in s) for s in shapes if len(s) == 2}
    assert ("Ascend910B", "H800") not in pairs and ("H800", "Ascend910B") in pairs
    for s in shapes:  # every kind gives a copy all its devices / n
        assert len({b.count * b.tp for b in s}) == 1
    # further orders try only the given combinations (the search passes the first order's best)
    best = frozenset((k, 8) for k in kinds)
    some = list(proportional_shapes(counts, tps, 82, orders, combos={best}))
    assert set(some) <= set(shapes)
    assert {tuple(b.tp for b in s) for s in some if len(s) == 4 and s[0].kind == kinds[0]} \
        == set(itertools.product([8, 4], repeat=4))
    assert {tp_combination(s) for s in some if len(s) == 4 and s[0].kind != kinds[0]} == {best}
    assert {tuple(b.kind for b in s) for s in some if len(s) == 4} == set(orders)
    # many kinds: sets of fewer kinds leave out one or two
    eight = {f"K{i}": 64 for i in range(8)}
    many = list(proportional_shapes(eight, {k: [8] for k in eight}, 82, [tuple(eight)]))
    assert {len(s) for s in many} == {6, 7, 8}
    assert len({tuple(b.kind for b in s) for s in many if len(s) == 6}) == 28


def test_large_cluster_plan_starts_with_a_roomy_kind_to_spare(monkeypatch):
    """mixed-1280-like (four vendors, 320 each; llama-70b, global batch 2048): the fastest,
    roomiest kind (H800) bounds the pipeline, and the search puts another kind first,
    for a shorter estimated step than the default order alone gives."""
    from hetrain.planner import search as search_mod

    big = cluster(("H800", 8, 40), ("Ascend910B", 8, 40), ("MLU370", 8, 40), ("BR104", 8, 40))
    cfg = model_config("llama-70b")
    cost = CostModel(big, model_spec(cfg, 4096))
    result = search_plan(big, cost, 2048)
    checked_memory_bytes(result.plan, cost)
    first = {result.plan.group_by_name[r.stages[0]].kind for r in result.plan.routes}
    assert "H800" not in first
    monkeypatch.setattr(search_mod, "kind_orders", lambda kinds: [tuple(kinds)])
    default = search_plan(big, cost, 2048)
    assert result.estimate.step_s < default.estimate.step_s


def test_micro_batch_sizes_left_before_any_partition_could_not_win(monkeypatch):
    """mixed-1024 + llama-70b, global batch 1024: micro-batches of 2, 4 and 8 are left on
    lower bounds of every shape they would take, before a single partition of theirs, and
    each searched alone finds nothing better (by the closed forms) than the search's
    answer at micro-batch 1."""
    from hetrain.cluster import load_cluster
    from hetrain.planner.partition import Partitioner

    mixed = load_cluster("examples/clusters/mixed-1024.yaml")
    cfg = model_config("llama-70b")
    cost = CostModel(mixed, model_spec(cfg, 4096))
    options = SearchOptions()
    partitioned: set[int] = set()
    solve_many = Partitioner.solve_many

    def recorded(self, pipelines, *args):
        partitioned.add(self.micro_batch_size)
        return solve_many(self, pipelines, *args)

    monkeypatch.setattr(Partitioner, "solve_many", recorded)
    result = search_plan(mixed, cost, 1024, options)
    assert result.candidates.micro_batch_size == 1
    assert partitioned == {1}
    for size in (2, 4, 8):
        alone = search_plan(mixed, cost, 1024, SearchOptions(micro_batch_sizes=(size,)))
        assert alone.solution.step_s > result.solution.step_s


def test_each_copy_run_once_per_search(three_kinds, monkeypatch):
    """The answer's copies are run for the singles' bar, the 1F1B check and the micro-batch-
    size hedge: each (template, schedule, micro-batches) once, with the figure a fresh run
    gives."""
    from collections import Counter

    from hetrain.planner import search as search_mod
    from hetrain.planner.templates import run_route_s

    runs: Counter = Counter()

    def counted(template, model, schedule, micro_batches):
        runs[(id(template), schedule, micro_batches)] += 1
        return run_route_s(template, model, schedule, micro_batches)

    monkeypatch.setattr(search_mod, "run_route_s", counted)
    cost = CostModel(three_kinds, model_spec(model_config("small"), 256))
    result = search_plan(three_kinds, cost, 16)
    assert runs and max(runs.values()) == 1
    cands = result.candidates
    for (t, schedule, m), seconds in cands.runs.items():
        assert seconds == run_route_s(cands.templates[t], cost.spec.name, schedule, m)


def test_sequence_pieces_only_for_models_whose_attention_takes_them(three_kinds):
    """The search cuts its answer into sequence pieces only where the model's stages run
    them (the reference decoder), and keeps whole sequences when told to (test_baselines:
    the mixed-1024 answer in pieces)."""
    from torch import nn

    from hetrain.model.loading import load_model
    from hetrain.model.source import WholeModule
    from hetrain.planner.options import SEQ_CHUNKS, model_options

    assert model_options(WholeModule(nn.Linear(2, 2), "lin")).seq_chunks == (1,)
    assert model_options(load_model("small")).seq_chunks == SEQ_CHUNKS
    cost = CostModel(three_kinds, model_spec(model_config("small"), 256))
    whole = search_plan(three_kinds, cost, 16, SearchOptions(seq_chunks=(1,)))
    assert whole.plan.seq_chunks == 1


def test_sharded_optimizer_state_makes_a_faster_plan_fit_a_memory_starved_mix():
    """RTX 4090 (24 GB) + BR104 (32 GB) + A100-40GB, llama-7b: the search's plan (4 shorter
    pipelines, no recomputation) fits only with each layer's optimizer state sharded across
    its holders; unsharded, the same plan is over memory, and the search without a sharded
    optimizer returns a slower one."""
    cluster = cluster_from_dict({
        "name": "starved",
        "nodes": [{"name": "rtx", "kind": "RTX4090", "count": 8},
                  {"name": "br", "kind": "BR104", "count": 8},
                  {"name": "a100", "kind": "A100-40GB", "count": 8}],
        "links": {"inter_node_gbps": 50, "inter_node_latency_us": 10, "bridge_gbps": 20}})
    cost = CostModel(cluster, model_spec(model_config("llama-7b"), 4096))
    sharded = search_plan(cluster, cost, 256)
    assert sharded.plan.sharded_optimizer
    checked_memory_bytes(sharded.plan, cost)  # fits
    unsharded_plan = sharded.plan.model_copy(update={"sharded_optimizer": False})
    with pytest.raises(PlanError, match="over memory"):
        checked_memory_bytes(unsharded_plan, cost)
    unsharded = search_plan(cluster, cost, 256, SearchOptions(sharded_optimizer=False))
    assert not unsharded.plan.sharded_optimizer
    checked_memory_bytes(unsharded.plan, cost)
    assert sharded.estimate.step_s < unsharded.estimate.step_s * 0.97

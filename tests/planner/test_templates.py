"""A template's closed form (fill + micro-batches x cycle) against the shared schedule's run
of the plan it places: the count program ranks shapes by the closed form, so a shape priced
below what it runs at can take the place of a faster one."""

from __future__ import annotations

import math

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.planner.counts import best_singles
from hetrain.planner.estimate import estimate_step
from hetrain.planner.options import SearchOptions
from hetrain.planner.placement import place_plan
from hetrain.planner.search import _as_1f1b, _best_1f1b_singles, search_plan
from hetrain.planner.templates import run_route_s

CLUSTERS = [
    # 256 BR104 alone, llama-70b (mixed-1024's BR104-alone baseline): a 41-stage TP-2 shape
    # was priced 56.6 s by its template, ran 67.6 s, and was the plan; two 16-stage TP-8
    # copies run 54.8 s
    ([("BR104", 32)], "llama-70b", 1024),
    ([("H100", 2), ("BR104", 6)], "llama-70b", 64),
    ([("A100-80GB", 2), ("BR104", 2), ("Ascend910B", 2)], "llama-13b", 96),
]


def _searched(kinds, model, global_batch):
    cluster = cluster_from_dict({
        "name": "t", "links": {"inter_node_gbps": 25, "bridge_gbps": 20},
        "nodes": [{"name": k.lower().replace("-", ""), "kind": k, "count": 8, "replicas": r}
                  for k, r in kinds]})
    cost = CostModel(cluster, model_spec(model_config(model), 4096))
    options = SearchOptions()
    result = search_plan(cluster, cost, global_batch, options)
    cands = result.candidates
    singles = []  # (template, micro-batches per copy, the schedule's price of its plan)
    for sol in best_singles(cands.templates, cands.micro_batches, within=1.0, most=4):
        (choice,) = sol.choices
        plan = place_plan(cluster, cost.spec, cands.templates, sol.choices,
                          cands.micro_batch_size, global_batch, options)
        singles.append((cands.templates[choice.template],
                        math.ceil(choice.micro_batches / choice.copies), estimate_step(plan, cost)))
    return result, singles


@pytest.fixture(scope="module", params=CLUSTERS, ids=["br104-256", "h100-br104", "three-kinds"])
def searched(request):
    return _searched(*request.param)


def test_the_best_shapes_are_priced_as_the_schedule_runs_them(searched, request):
    """The two best single-shape plans by their templates: the template's time of a copy is
    the schedule's, within 3 % (the fill and cycle come from a run of about 2 S
    micro-batches; the plans run 24-512 per copy), and so is the run the final ranking
    makes of one copy at its own micro-batches."""
    _, singles = searched
    model = request.node.callspec.params["searched"][1]
    for template, per_copy, priced in singles[:2]:
        ran = max(priced.route_s)
        assert template.route_s(per_copy) == pytest.approx(ran, rel=0.03), template.describe()
        rerun = run_route_s(template, model, "zero_bubble", per_copy)
        assert rerun == pytest.approx(ran, rel=0.03), template.describe()


def test_the_plan_is_as_fast_as_the_best_shapes_priced(searched):
    """The search's plan is at least as fast, as the schedule and sync price it, as each of
    the four best single-shape plans by their templates."""
    result, singles = searched
    for template, _, priced in singles:
        assert result.estimate.step_s <= priced.step_s * (1 + 1e-9), template.describe()


def test_long_pipelines_of_small_tp_groups_are_tried_under_1f1b():
    """320 BR104 alone, llama-70b, global batch 2048 (mixed-1280's BR104-alone baseline):
    split backwards lose on long TP-2 pipelines, which the zero-bubble closed forms then
    rank low; the best shape by 1F1B's closed form, run under 1F1B, is priced too, and the
    plan is at least as fast as it."""
    model, global_batch = "llama-70b", 2048
    cluster = cluster_from_dict({
        "name": "t", "links": {"inter_node_gbps": 25, "bridge_gbps": 20},
        "nodes": [{"name": "br104", "kind": "BR104", "count": 8, "replicas": 40}]})
    cost = CostModel(cluster, model_spec(model_config(model), 4096))
    options = SearchOptions()
    result = search_plan(cluster, cost, global_batch, options)
    cands = result.candidates
    (best,) = _best_1f1b_singles(cands)[:1]
    plan = _as_1f1b(place_plan(cluster, cost.spec, cands.templates, best.choices,
                               cands.micro_batch_size, global_batch, options))
    assert result.estimate.step_s <= estimate_step(plan, cost).step_s * (1 + 1e-9)
    assert result.plan.schedule == "1f1b"  # where it wins here

"""The count program: exact when tails shrink with more copies, and within a budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.cost.tables import TableCache
from hetrain.model import model_config, model_spec
from hetrain.planner import counts
from hetrain.planner.counts import choose_counts, evaluate
from hetrain.planner.search import SearchOptions, build_candidates
from tests.planner.brute import brute_counts

# L40S talk over PCIe inside a node (32 GB/s), slower than this network: a stage's replicas
# sync faster once they span nodes, so allowed copy counts are not always 1..n.
CLUSTER = cluster_from_dict({
    "nodes": [{"name": "l", "kind": "L40S", "count": 2, "replicas": 2},
              {"name": "h", "kind": "H100", "count": 1}],
    "links": {"inter_node_gbps": 400, "bridge_gbps": 400, "inter_node_latency_us": 1}})


@pytest.fixture(scope="module")
def candidates():
    cost = CostModel(CLUSTER, model_spec(model_config("small"), 512))
    cands = build_candidates(CLUSTER, cost, TableCache(cost), 64, 1, SearchOptions())
    # The builder keeps tails non-decreasing in copies; the program must stay exact when a
    # caller's do shrink (the slow links above), so hand it shrinking ones.
    shrinking = [replace(t, tail_s=t.tail_s[::-1].copy()) for t in cands.templates]
    return replace(cands, templates=shrinking)


def test_exact_when_tails_shrink_with_copies(candidates, monkeypatch):
    calls = []
    original = counts.CountProblem._select_pairs
    monkeypatch.setattr(counts.CountProblem, "_select_pairs",
                        lambda self, *a: calls.append(1) or original(self, *a))
    sol = choose_counts(candidates.templates, candidates.micro_batches, candidates.capacity,
                        candidates.max_shapes, candidates.pipeline_bound_s)
    want = brute_counts(CLUSTER, candidates.templates, candidates.micro_batches,
                        candidates.max_shapes)
    assert sol.step_s == pytest.approx(want, rel=1e-9)
    assert calls, "the per-(template, copies) program was not needed"
    assert sol == evaluate(candidates.templates, sol.choices)
    assert sum(c.micro_batches for c in sol.choices) == candidates.micro_batches


def test_budget_returns_the_best_found(candidates):
    full = choose_counts(candidates.templates, candidates.micro_batches, candidates.capacity,
                         candidates.max_shapes)
    for budget in (0, 1, 3):
        sol = choose_counts(candidates.templates, candidates.micro_batches, candidates.capacity,
                            candidates.max_shapes, max_programs=budget)
        assert sol.step_s >= full.step_s
        assert sum(c.micro_batches for c in sol.choices) == candidates.micro_batches
    assert choose_counts([], 8, {}, 4) is None


def test_budget_starts_no_step_it_cannot_finish(candidates, monkeypatch):
    """A staircase step is a bisection over deadlines and one over tails: a budget too small
    for both runs no program (a cut-short step would change nothing), and a budget that
    covers the steps answers as if there were none."""
    calls = []
    original = counts.CountProblem._select
    monkeypatch.setattr(counts.CountProblem, "_select",
                        lambda self, *a: calls.append(a) or original(self, *a))
    args = (candidates.templates, candidates.micro_batches, candidates.capacity,
            candidates.max_shapes)
    full = choose_counts(*args)
    used = len(calls)
    assert used > 0
    calls.clear()
    assert choose_counts(*args, max_programs=2) == counts.best_single(
        candidates.templates, candidates.micro_batches)
    assert not calls
    assert choose_counts(*args, max_programs=used + 64) == full

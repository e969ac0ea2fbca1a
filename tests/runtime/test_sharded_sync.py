"""Gradient sync as plan/sync.py defines it: each bucket a sharded sum (reduce-scatter inside a
kind, cross-kind sum of each segment among its owners, all-gather inside the kind) on a comm
thread, in the global bucket order; exact against one-process training."""

from __future__ import annotations

from collections import defaultdict

import pytest

from hetrain.cluster import load_cluster
from hetrain.comm.sharded import FlatLayout
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan import expand_plan
from hetrain.plan.sync import reductions, shard_bounds, sync_buckets
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, run_plan


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def _covers(ranges, numel):
    ranges = sorted(r for r in ranges if r[0] < r[1])
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize("numel", [7, 1001])
def test_flat_layout_cuts_kinds_at_every_boundary(numel):
    """Kinds of 2, 4 and 1 members with uneven weights: every kind's shards cover the buffer;
    each segment lies in one shard of every kind; ZeRO pieces cover it once, and a member's
    share is its weight over all members' (to a few elements of rounding)."""
    kind_of = {0: "a", 1: "a", 2: "b", 3: "b", 4: "b", 5: "b", 6: "c"}
    weight_of = {0: 1.0, 1: 3.0, 2: 1.0, 3: 1.0, 4: 2.0, 5: 1.0, 6: 2.5}
    lay = FlatLayout.build(tuple(kind_of), kind_of, weight_of, numel, shard_bounds)
    for members in lay.members.values():
        _covers([lay.kind_shards[r] for r in members], numel)
    _covers([(s.start, s.end) for s in lay.segments], numel)
    for seg in lay.segments:
        assert [kind_of[r] for r in seg.owners] == lay.kinds
        for r in seg.owners:
            assert lay.kind_shards[r][0] <= seg.start < seg.end <= lay.kind_shards[r][1]
    pieces = [p for r in kind_of for p in lay.zero_pieces(r)]
    _covers(pieces, numel)
    assert sum(b - a for a, b in pieces) == numel
    total = sum(weight_of.values())
    for r, w in weight_of.items():
        share = sum(b - a for a, b in lay.zero_pieces(r))
        assert abs(share - numel * w / total) <= len(lay.segments)


def _run(cluster, raw, steps=2, **cfg):
    plan = expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, **raw}, cluster)
    result = run_plan(cluster, plan, steps=steps, trace=True, **cfg)
    assert_matches_reference(result, steps=steps)
    return result


def _bucket_order_per_lane(result):
    """Per device, the bucket indices of its sync events, in the order they started."""
    out = defaultdict(list)
    for e in sorted(result.events, key=lambda e: e["start_s"]):
        if e["name"].startswith("sync b"):
            out[e["lane"]].append(int(e["name"][6:]))
    return out


@pytest.mark.slow
def test_mixed_tp_degrees_and_uneven_kind_counts(cluster):
    """Holders of TP 2 (H100), TP 4 (A100) and TP 1 (BR104) sum full tensors: per bucket, two
    H100, four A100 and one BR104 device split the buffer at the union of their shards."""
    result = _run(cluster, {"pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 6]}]},
        {"micro_batches": 1, "stages": [{"kind": "A100-80GB", "tp": 4, "layers": [0, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "BR104", "layers": [0, 3]},
                                        {"kind": "BR104", "layers": [3, 6]}]},
    ]})
    plan = result.plan
    buckets = sync_buckets(plan, model_spec(model_config("tiny"), plan.seq_len))
    assert [len(reductions(plan, b)[0]) for b in buckets] == [7, 7]
    for lane, order in _bucket_order_per_lane(result).items():
        mine = [b.index for b in buckets if any(lane in s for s in reductions(plan, b))]
        assert order == mine * 2, lane  # every step, the global order


@pytest.mark.slow
def test_shard_wise_sets_across_three_kinds(cluster):
    """TP 1 holders: layers 0-1 summed by two H100 groups and one A100, layer 2 by two H100
    and one BR104, layers 3-5 by one group of each kind."""
    result = _run(cluster, {"pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]},
        {"micro_batches": 1, "stages": [{"kind": "A100-80GB", "layers": [0, 2]},
                                        {"kind": "BR104", "layers": [2, 6]}]},
    ]})
    assert len(sync_buckets(result.plan, model_spec(model_config("tiny"), 16))) == 3
    assert all(order == sorted(order[:len(order) // 2]) * 2
               for order in _bucket_order_per_lane(result).values())

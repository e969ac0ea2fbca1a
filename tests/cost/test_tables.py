"""The vectorised tables give, for every layer range, what CostModel gives for that range."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel, Profile, ring_allreduce_s
from hetrain.cost.profile import KindProfile, ProfileEntry
from hetrain.cost.tables import TableCache
from hetrain.model import model_config, model_spec
from hetrain.plan import StageGroup

CLUSTER = cluster_from_dict({"nodes": [
    {"name": "h", "kind": "H100", "count": 4}, {"name": "b", "kind": "BR104", "count": 2},
    {"name": "c", "kind": "cpu", "count": 1}]})


def group(kind, tp, layers, dtype, recompute):
    return StageGroup(name="g", kind=kind, devices=[f"x{i}" for i in range(tp)], layers=layers,
                      dtype=dtype, recompute=recompute)


@pytest.mark.parametrize("model,kind,tp,dtype,mbs", [
    ("llama-7b", "H100", 4, "bf16", 1), ("llama-7b", "BR104", 2, "fp16", 2),
    ("tiny", "cpu", 1, "fp32", 4), ("small", "H100", 1, "fp32", 8)])
def test_tables_match_cost_model(model, kind, tp, dtype, mbs):
    spec = model_spec(model_config(model), 256)
    cost = CostModel(CLUSTER, spec)
    tables = TableCache(cost).get(kind, tp, dtype, mbs)
    n = spec.n_layers
    for a, b in itertools.combinations(range(n + 1), 2):
        for rc in (False, True):
            g = group(kind, tp, (a, b), dtype, rc)
            want = sum(cost.stage_compute_s(g, op, mbs, spec.seq_len)
                       for op in ("forward", "backward"))
            assert tables.time_s[rc][a, b] == pytest.approx(want, rel=1e-12)
            for in_flight in (1, 3):
                per = tables.per_in_flight_bytes[rc][a, b]
                mem = max(tables.fixed_bytes[rc][a, b] + in_flight * per,
                          tables.floor_bytes[a, b])
                assert mem == pytest.approx(cost.stage_memory_bytes(g, mbs, in_flight), rel=1e-12)
    # empty and backwards ranges never fit
    assert np.isinf(tables.time_s[0][3, 3]) and np.isinf(tables.time_s[1][4, 2])


def test_tables_follow_a_profile():
    spec = model_spec(model_config("tiny"), 64)
    n = spec.n_layers
    prof = Profile(model="tiny", seq_len=64, kinds={"cpu": KindProfile(
        device="cpu", dtype="fp32", entries=[ProfileEntry(
            forward_s_per_token=[1e-6 * (i + 1) for i in range(n)],
            backward_s_per_token=[2e-6 * (i + 1) for i in range(n)])])})
    cost = CostModel(CLUSTER, spec, prof)
    tables = TableCache(cost).get("cpu", 1, "fp32", 2)
    g = group("cpu", 1, (1, 4), "fp32", False)
    want = sum(cost.stage_compute_s(g, op, 2, 64) for op in ("forward", "backward"))
    assert tables.time_s[0][1, 4] == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(128 * 3e-6 * (2 + 3 + 4), rel=1e-12)
    # kinds the profile lacks keep the roofline
    assert cost.layers_compute_s("H100", (1, 4), 128, "forward", "bf16") == pytest.approx(
        CostModel(CLUSTER, spec).layers_compute_s("H100", (1, 4), 128, "forward", "bf16"))


def test_collectives():
    cost = CostModel(CLUSTER, model_spec(model_config("tiny"), 64))
    members = ["h:0", "h:1", "h:2"]
    lat = CLUSTER.link_latency_s("h:0", "h:1")
    # one kind: the sharded sum is a ring (reduce-scatter + all-gather)
    assert cost.sync_s(members, 1e6) == ring_allreduce_s(3, 1e6, cost.ring_gbps(members), lat)
    assert ring_allreduce_s(1, 1e6, 10, 0) == 0.0 and ring_allreduce_s(4, 0, 10, 0) == 0.0
    assert cost.bridge_allreduce_s(1, 1e9) == 0.0
    two, three = cost.bridge_allreduce_s(2, 1e9), cost.bridge_allreduce_s(3, 1e9)
    assert 0 < two < three  # more parties, more to move
    assert two == pytest.approx(1e9 / (20 * 1e9) + 2 * 10e-6)  # default 20 GB/s bridge, 10 us


def test_a_sharded_sum_across_kinds_moves_shards_over_the_bridge():
    cost = CostModel(CLUSTER, model_spec(model_config("tiny"), 64))
    h, b = ["h:0", "h:1", "h:2", "h:3"], ["b:0", "b:1"]
    nbytes = 8e6
    inside = max(cost.sync_s(h, nbytes), cost.sync_s(b, nbytes))  # the rings, side by side
    # then each of BR104's 2 ranks (the fewer) sums its half with its peer of the other kind
    lat = CLUSTER.link_latency_s("h:0", "b:0")
    bw = min(cost.ring_gbps(["h:0", "b:0"]), CLUSTER.links.bridge_gbps) * 1e9
    bridge = 2 * (1 / 2) * (nbytes / 2) / bw + 2 * lat
    assert cost.sync_s(h + b, nbytes) == pytest.approx(inside + bridge)
    # a leader per kind carrying the whole buffer would pay twice the bridge bytes
    assert cost.sync_s(h + b, nbytes) < inside + 2 * (1 / 2) * nbytes / bw + 2 * lat


def test_sequence_parallelism_splits_what_tensor_parallelism_left_whole():
    cfg = model_config("llama-70b")
    split, plain = model_spec(cfg, 4096), model_spec(cfg, 4096, sequence_parallel=False)
    assert split.sequence_parallel(8) and not split.sequence_parallel(1)
    assert not plain.sequence_parallel(8)  # Hugging Face layers: the runtime does not split
    assert not model_spec(cfg, 4095).sequence_parallel(8)  # uneven: plain TP, priced so
    g = group("H100", 8, (1, 11), "bf16", False)
    with_sp = CostModel(CLUSTER, split).activation_bytes_peak(g, 1, 4)
    without = CostModel(CLUSTER, plain).activation_bytes_peak(g, 1, 4)
    assert with_sp < 0.65 * without  # norms and residuals were most of a TP-8 block's share
    rc = group("H100", 8, (1, 11), "bf16", True)
    assert CostModel(CLUSTER, split).activation_bytes_peak(rc, 1, 4) < \
        CostModel(CLUSTER, plain).activation_bytes_peak(rc, 1, 4)
    for spec in (split, plain, model_spec(cfg, 4095)):  # the tables price both ways alike
        cost = CostModel(CLUSTER, spec)
        tables = TableCache(cost).get("H100", 8, "bf16", 1)
        for recompute in (False, True):
            want = cost.stage_memory_bytes(group("H100", 8, (1, 11), "bf16", recompute), 1, 4)
            fixed, per = tables.fixed_bytes[recompute][1, 11], \
                tables.per_in_flight_bytes[recompute][1, 11]
            assert fixed + 4 * per == pytest.approx(want, rel=1e-9)

"""The simulated step equals the closed form wherever one can be written by hand."""

from __future__ import annotations

import pytest

from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.plan import expand_plan
from hetrain.sim import simulate_plan

from .helpers import SEQ_LEN, FixedCost, line_cluster, pipeline_plan


def _data_parallel(cluster, micro_batches: list[int], mbs: int = 2):
    shares = [{"device": f"n{i}:0", "samples": m * mbs} for i, m in enumerate(micro_batches)]
    return expand_plan({"model": "tiny", "seq_len": SEQ_LEN, "micro_batch_size": mbs,
                        "n_layers": 6, "data_parallel": shares}, cluster)


def test_one_stage_is_m_times_f_plus_b_plus_optimizer():
    cluster = line_cluster(1)
    cost = CostModel(cluster, model_spec(model_config("tiny"), SEQ_LEN))
    plan = _data_parallel(cluster, [5])
    g = plan.stage_groups[0]
    f = cost.stage_compute_s(g, "forward", 2, SEQ_LEN)
    b = cost.stage_compute_s(g, "backward", 2, SEQ_LEN)
    opt = cost.optimizer_s(g.kind, cost.spec.range_params(0, 6))
    result = simulate_plan(plan, cluster, cost)
    assert result.step_s == pytest.approx(5 * (f + b) + opt, rel=1e-12)
    assert result.exposed_comm_s == 0.0
    dev = result.devices["n0:0"]
    assert dev.busy_share == pytest.approx(1.0)
    assert dev.bubble_s == pytest.approx(0.0, abs=1e-15)


def test_data_parallel_adds_one_allreduce_of_all_gradients():
    cluster = line_cluster(2, latency_us=10)
    cost = CostModel(cluster, model_spec(model_config("tiny"), SEQ_LEN))
    plan = _data_parallel(cluster, [4, 4])
    g = plan.stage_groups[0]
    f = cost.stage_compute_s(g, "forward", 2, SEQ_LEN)
    b = cost.stage_compute_s(g, "backward", 2, SEQ_LEN)
    sync = cost.sync_s(["n0:0", "n1:0"], cost.spec.range_params(0, 6) * 4)  # fp32 grads
    opt = cost.optimizer_s(g.kind, cost.spec.range_params(0, 6))
    result = simulate_plan(plan, cluster, cost)
    assert sync > 0
    assert result.step_s == pytest.approx(4 * (f + b) + sync + opt, rel=1e-12)
    assert result.exposed_comm_s == pytest.approx(sync, rel=1e-9)
    assert result.devices["n0:0"].comm_wait_s == pytest.approx(sync, rel=1e-9)


def test_sync_waits_for_the_slowest_member():
    cluster = line_cluster(2)
    result = simulate_plan(_data_parallel(cluster, [3, 5], mbs=1), cluster,
                           FixedCost(cluster, sync=0.5, opt=0.25))
    # the 3-micro-batch device idles (bubble) until the other finishes, then both sync
    assert result.step_s == pytest.approx(5 * 3 + 0.5 + 0.25)
    fast = result.devices["n0:0"]
    assert fast.bubble_s == pytest.approx(2 * 3)
    assert fast.comm_wait_s == pytest.approx(0.5)
    # no order of actions fills it: the other computes 6 s longer (plan.schedule.imbalance_s)
    assert fast.imbalance_s == pytest.approx(2 * 3)
    assert result.devices["n1:0"].imbalance_s == pytest.approx(0.0)


@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_two_equal_stages_with_free_links(m):
    cluster = line_cluster(2)
    result = simulate_plan(pipeline_plan(cluster, 2, m), cluster, FixedCost(cluster, opt=0.5))
    assert result.step_s == pytest.approx((m + 1) * 3.0 + 0.5)


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_1f1b_bubble_formula(stages, m):
    cluster = line_cluster(stages)
    f, b = 1.0, 2.5
    result = simulate_plan(pipeline_plan(cluster, stages, m), cluster, FixedCost(cluster, f=f, b=b))
    assert result.step_s == pytest.approx((m + stages - 1) * (f + b))
    # every stage computes m*(f+b); the rest of the step is its bubble
    for dev in result.devices.values():
        assert dev.busy_s == pytest.approx(m * (f + b))
        assert dev.bubble_share == pytest.approx((stages - 1) / (m + stages - 1))
        assert dev.imbalance_s == pytest.approx(0.0, abs=1e-12)  # equal stages: all is fill


@pytest.mark.parametrize("stages", [2, 3, 5])
def test_one_micro_batch_pays_every_transfer(stages):
    cluster = line_cluster(stages)
    c = 0.125
    result = simulate_plan(pipeline_plan(cluster, stages, 1), cluster, FixedCost(cluster, p2p=c))
    assert result.step_s == pytest.approx(stages * 3.0 + 2 * (stages - 1) * c)
    assert result.exposed_comm_s == pytest.approx(2 * (stages - 1) * c)


class LatencyPlusBytes(FixedCost):
    """Every transfer takes `p2p` seconds, of which the link's latency (a transfer of no
    bytes) and the rest its bytes."""

    def p2p_s(self, src_device, dst_device, nbytes):
        latency_s = self.cluster.link_latency_s(src_device, dst_device)
        return self.p2p if nbytes > 0 else latency_s


def test_transfers_on_one_link_serialize():
    latency_us, c = 10.0, 0.5
    shared = line_cluster(2, per_node=2, latency_us=latency_us)  # both pipelines n0 -> n1
    devices = [["n0:0", "n1:0"], ["n0:1", "n1:1"]]
    plan = pipeline_plan(shared, 2, 1, pipelines=2, devices=devices)
    result = simulate_plan(plan, shared, LatencyPlusBytes(shared, p2p=c))
    recv = sorted(e.start_s for e in result.events if e.name == "recv" and e.args["op"] ==
                  "forward")
    # the second waits for the first one's bytes (not its latency) to leave the link
    assert recv == pytest.approx([1.0, 1.0 + c - latency_us * 1e-6])

    apart = line_cluster(4, latency_us=latency_us)  # each pipeline on its own pair of nodes
    plan = pipeline_plan(apart, 2, 1, pipelines=2,
                         devices=[["n0:0", "n1:0"], ["n2:0", "n3:0"]])
    result = simulate_plan(plan, apart, LatencyPlusBytes(apart, p2p=c))
    recv = [e.start_s for e in result.events if e.name == "recv" and e.args["op"] == "forward"]
    assert recv == pytest.approx([1.0, 1.0])


def test_latency_on_one_link_overlaps():
    # A cost model whose transfers are all latency (a measured fit with no per-byte term, as
    # bench sim's runs give): transfers on one pair of nodes do not wait for each other.
    c = 0.5
    shared = line_cluster(2, per_node=2)
    plan = pipeline_plan(shared, 2, 1, pipelines=2, devices=[["n0:0", "n1:0"], ["n0:1", "n1:1"]])
    result = simulate_plan(plan, shared, FixedCost(shared, p2p=c))
    recv = [e.start_s for e in result.events if e.name == "recv" and e.args["op"] == "forward"]
    assert recv == pytest.approx([1.0, 1.0])


def test_gradient_sync_overlaps_the_earlier_stages_backward():
    m, sync, opt = 4, 0.75, 0.25
    cluster = line_cluster(4)
    plan = pipeline_plan(cluster, 2, m, pipelines=2)
    result = simulate_plan(plan, cluster, FixedCost(cluster, sync=sync, opt=opt))
    # the last stages finish one backward (b = 2) before the first stages: their sync starts
    # then, hidden under the first stages' last backward
    last_stage_sync = [e for e in result.events
                       if e.name == "allreduce" and e.args["layers"][0] > 0]
    assert [e.start_s for e in last_stage_sync] == pytest.approx([(m + 1) * 3.0 - 2.0] * 2)
    assert result.step_s == pytest.approx((m + 1) * 3.0 + sync + opt)
    assert result.exposed_comm_s == pytest.approx(sync)

"""Invalid plans are refused with a message naming the problem."""

from __future__ import annotations

import pytest

from hetrain.cluster import load_cluster
from hetrain.cost import CostModel
from hetrain.errors import PlanError
from hetrain.model import model_config, model_spec
from hetrain.plan import check_memory, expand_plan, validate_plan
from hetrain.plan.validate import plan_memory_fn
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


SPEC = model_spec(model_config("tiny"), 16)


def _plan(cluster, groups, routes, global_batch=8):
    return expand_plan({"model": "tiny", "seq_len": 16, "global_batch": global_batch,
                        "stage_groups": groups, "routes": routes}, cluster)


def _g(name, kind, devices, layers):
    return {"name": name, "kind": kind, "devices": devices, "layers": layers}


def _refused(cluster, plan, *words):
    with pytest.raises(PlanError) as err:
        validate_plan(plan, cluster, SPEC)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_valid_plan_passes(cluster):
    plan = _plan(cluster, [_g("a", "H100", ["h100:0"], [0, 3]),
                           _g("b", "A100-80GB", ["a100:0"], [3, 6])],
                 [{"stages": ["a", "b"], "micro_batches": 4, "micro_batch_size": 2}])
    validate_plan(plan, cluster, SPEC)


def test_layer_gap_is_refused(cluster):
    plan = _plan(cluster, [_g("a", "H100", ["h100:0"], [0, 2]),
                           _g("b", "A100-80GB", ["a100:0"], [3, 6])],
                 [{"stages": ["a", "b"], "micro_batches": 4, "micro_batch_size": 2}])
    _refused(cluster, plan, "layer gap", "2..2")


def test_route_stopping_early_is_a_gap(cluster):
    plan = _plan(cluster, [_g("a", "H100", ["h100:0"], [0, 4])],
                 [{"stages": ["a"], "micro_batches": 4, "micro_batch_size": 2}])
    _refused(cluster, plan, "layer gap", "4..5")


def test_layer_overlap_is_refused(cluster):
    plan = _plan(cluster, [_g("a", "H100", ["h100:0"], [0, 4]),
                           _g("b", "A100-80GB", ["a100:0"], [3, 6])],
                 [{"stages": ["a", "b"], "micro_batches": 4, "micro_batch_size": 2}])
    _refused(cluster, plan, "layer overlap", "'b'")


def test_device_used_twice_is_refused(cluster):
    plan = _plan(cluster, [_g("a", "H100", ["h100:0"], [0, 6]),
                           _g("b", "H100", ["h100:0"], [0, 6])],
                 [{"stages": ["a"], "micro_batches": 2, "micro_batch_size": 2},
                  {"stages": ["b"], "micro_batches": 2, "micro_batch_size": 2}])
    _refused(cluster, plan, "h100:0", "used twice")


def test_kind_not_in_cluster_is_refused(cluster):
    plan = _plan(cluster, [_g("a", "MI300X", ["h100:0"], [0, 6])],
                 [{"stages": ["a"], "micro_batches": 4, "micro_batch_size": 2}])
    _refused(cluster, plan, "MI300X", "not in the cluster")


def test_kind_not_in_cluster_in_shorthand_is_refused(cluster):
    with pytest.raises(PlanError, match="Gaudi2.*not in the cluster"):
        expand_plan({"model": "tiny", "seq_len": 16, "pipelines": [
            {"micro_batches": 2, "stages": [{"kind": "Gaudi2", "layers": [0, 6]}]}]}, cluster)


def test_batch_mismatch_is_refused(cluster):
    plan = _plan(cluster, [_g("a", "H100", ["h100:0"], [0, 6])],
                 [{"stages": ["a"], "micro_batches": 4, "micro_batch_size": 2}], global_batch=9)
    _refused(cluster, plan, "global_batch is 9")


def test_stage_over_memory_is_refused():
    cluster = load_cluster(EXAMPLES / "clusters" / "three-kinds.yaml")
    spec = model_spec(model_config("llama-70b"), 4096)
    plan = expand_plan({"model": "llama-70b", "seq_len": 4096, "micro_batch_size": 1,
                        "pipelines": [{"micro_batches": 4, "stages": [
                            {"kind": "H100", "layers": [0, 60]},
                            {"kind": "BR104", "layers": [60, 70]},
                            {"kind": "A100-80GB", "layers": [70, 82]}]}]}, cluster)
    validate_plan(plan, cluster, spec)  # structurally fine
    cost = CostModel(cluster, spec)
    with pytest.raises(PlanError, match="'p0s0' is over memory: needs .* GiB per H100"):
        check_memory(plan, cluster, lambda g, n: cost.stage_memory_bytes(g, 1, n))


class _Recorder:
    """A StageMemory that records what plan_memory_fn asks of it."""

    spec = SPEC

    def __init__(self):
        self.asked = {}
        self.single = {}

    def stage_memory_bytes(self, group, micro_batch_size, in_flight, optimizer_params=None,
                           sync_bytes=None, single_backward=False, pieces=1):
        self.asked[group.name, group.dtype] = sync_bytes
        self.single[group.name] = single_backward
        return 0.0


def test_memory_prices_the_sync_buffers_in_the_run_dtype(cluster):
    plan = expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "n_layers": 6,
                        "data_parallel": [{"kind": "H100", "samples": 4},
                                          {"kind": "A100-80GB", "samples": 2}]}, cluster)
    recorder = _Recorder()
    memory = plan_memory_fn(plan, recorder)
    for g in plan.stage_groups:
        for dtype in ("fp32", "fp64"):  # a float32 and a float64 run
            memory(g.model_copy(update={"dtype": dtype}), 1)
    for g in ("dp0", "dp1"):  # flat gradients in the master dtype of the run
        sync32, sync64 = recorder.asked[g, "fp32"], recorder.asked[g, "fp64"]
        assert sync64 == pytest.approx(2 * sync32) and sync32 > 0


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_memory_knows_the_groups_that_run_one_whole_backward_a_step(cluster, schedule):
    def singles(raw):
        plan = expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2,
                            "schedule": schedule, **raw}, cluster)
        recorder = _Recorder()
        memory = plan_memory_fn(plan, recorder)
        for g in plan.stage_groups:
            memory(g, 1)
        return recorder.single

    # dp1 runs one micro-batch a step; a first stage's backward is whole under either schedule
    assert singles({"n_layers": 6, "data_parallel": [{"kind": "H100", "samples": 4},
                                      {"kind": "A100-80GB", "samples": 2}]}) == \
        {"dp0": False, "dp1": True}
    # a later stage splits under zero-bubble: it keeps its input-gradient pass's tensors while
    # the gradients build, so it is priced as holding both
    assert singles({"pipelines": [{"micro_batches": 1, "stages": [
        {"kind": "H100", "layers": [0, 3]}, {"kind": "A100-80GB", "layers": [3, 6]}]}]}) == \
        {"p0s0": True, "p0s1": schedule == "1f1b"}


def test_sequence_chunks_that_do_not_divide_the_sequence_are_refused(cluster):
    with pytest.raises(PlanError) as err:
        expand_plan({"model": "tiny", "seq_len": 16, "seq_chunks": 3, "micro_batch_size": 2,
                     "pipelines": [{"micro_batches": 2,
                                    "stages": [{"kind": "H100", "layers": [0, 6]}]}]},
                    cluster)
    assert "seq_chunks" in str(err.value) and "divisor" in str(err.value)


def test_sequence_pieces_too_short_for_sequence_parallelism_are_refused(cluster):
    """A TP-2 group splits each piece's sequence over its ranks: 16 tokens in 16 pieces
    leave one token a piece."""
    plan = expand_plan({"model": "tiny", "seq_len": 16, "seq_chunks": 16,
                        "micro_batch_size": 2,
                        "pipelines": [{"micro_batches": 2, "stages": [
                            {"kind": "H100", "tp": 2, "layers": [0, 6]}]}]}, cluster)
    _refused(cluster, plan, "seq_chunks", "tensor-parallel", "fewer sequence chunks")


def test_memory_counts_sequence_pieces_as_parts_of_micro_batches(cluster):
    """The schedule's peak counts pieces: c pieces hold one micro-batch's activations (a
    part of one rounded up), and the pieces' keys and values on top (test_memory.py
    measures them)."""
    raw = {"model": "tiny", "seq_len": 16, "micro_batch_size": 2,
           "pipelines": [{"micro_batches": 4, "stages": [
               {"kind": "H100", "layers": [0, 3]}, {"kind": "A100-80GB", "layers": [3, 6]}]}]}
    cost = CostModel(cluster, SPEC)
    whole = expand_plan(raw, cluster)
    pieces = expand_plan({**raw, "seq_chunks": 4}, cluster)
    first = whole.stage_groups[0]
    in_pieces, in_whole = plan_memory_fn(pieces, cost), plan_memory_fn(whole, cost)
    assert in_pieces(first, 5) == in_pieces(first, 8)
    assert in_whole(first, 2) < in_pieces(first, 8) < in_whole(first, 3)
    assert in_pieces(first, 9) > in_whole(first, 3)

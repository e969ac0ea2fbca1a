"""On a CUDA machine: the local GPU as a real kind beside two emulated kinds, in one job.
Skipped cleanly without CUDA (tests/conftest.py); `scripts/device-check.sh` runs them."""

from __future__ import annotations

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.planner import data_parallel_plan
from tests.helpers import assert_matches_reference, run_plan

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gpu_and_emulated():
    """The first CUDA device as a real kind (declared: any NVIDIA or ROCm GPU), and two
    catalog kinds forced to emulation whatever this machine has."""
    return cluster_from_dict({
        "name": "gpu-and-emulated",
        "kinds": {
            "local-gpu": {"vendor": "nvidia", "device_type": "cuda", "mode": "real",
                          "flops": {"fp32": 60e12, "bf16": 900e12}, "memory_gib": 40,
                          "memory_bandwidth_gbps": 2000, "source": "test: any CUDA GPU"},
            "V100": {"mode": "emulated"},
            "MLU370": {"mode": "emulated"},
        },
        "nodes": [{"name": "gpu", "kind": "local-gpu"}, {"name": "v100", "kind": "V100"},
                  {"name": "mlu", "kind": "MLU370"}]})


def test_cuda_kind_and_two_emulated_kinds_train_exactly_in_float32():
    cluster = gpu_and_emulated()
    plan = data_parallel_plan(cluster, CostModel(cluster, model_spec(model_config("tiny"), 16)),
                              24)
    result = run_plan(cluster, plan, steps=3, precision="float32")
    modes = result.summary()["modes"]
    assert modes == {"local-gpu": "real", "V100": "emulated", "MLU370": "emulated"}
    assert result.per_kind["local-gpu"]["device_type"] == "cuda"
    # float32 on two devices sums in different orders: tolerances of float32, not float64.
    assert_matches_reference(result, steps=3, precision="float32", rtol=1e-4)
    # Measured peak memory of the real device is reported beside the estimate.
    gpu_group = next(g for g in result.per_group.values() if g["kind"] == "local-gpu")
    assert gpu_group["measured_bytes"] > 0 and gpu_group["estimated_bytes"] > 0


def test_a_bf16_run_on_the_cuda_kind_follows_the_fp32_loss_curve_within_2_percent():
    cluster = gpu_and_emulated()
    plan = data_parallel_plan(cluster, CostModel(cluster, model_spec(model_config("tiny"), 16)),
                              24)
    fp32 = run_plan(cluster, plan, steps=20, precision="float32", lr=3e-3)
    mixed = run_plan(cluster, plan, steps=20, precision="bf16", lr=3e-3)
    # The GPU computes in bf16, the emulated V100 in fp16 with loss scaling.
    assert mixed.per_kind["local-gpu"]["dtype"] == "bf16"
    assert mixed.per_kind["V100"]["dtype"] == "fp16"
    for want, got in zip(fp32.losses, mixed.losses, strict=True):
        assert got == pytest.approx(want, rel=0.02)
    gpu_group = next(g for g in mixed.per_group.values() if g["kind"] == "local-gpu")
    assert 0 < gpu_group["measured_bytes"] <= gpu_group["estimated_bytes"]

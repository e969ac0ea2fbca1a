"""A 1,024-device llama-70b plan simulates in seconds; the time is printed as a figure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.plan import expand_plan, load_plan
from hetrain.sim import simulate_plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

KINDS = ("H100", "A100-80GB", "Ascend910B", "BR104")


def _cross_kind_pipelines(cluster):
    """16 pipelines (4 per kind) of 8 stages x 8-way TP: every layer is synced across kinds."""
    bounds = [0, 11, 21, 31, 41, 51, 61, 71, 82]
    pipes = [{"micro_batches": 32,
              "stages": [{"kind": kind, "tp": 8, "layers": [bounds[s], bounds[s + 1]],
                          "dtype": "bf16", "recompute": True} for s in range(8)]}
             for kind in KINDS for _ in range(4)]
    return expand_plan({"model": "llama-70b", "seq_len": 4096, "micro_batch_size": 1,
                        "pipelines": pipes}, cluster)


@pytest.mark.parametrize("which", ["mesh example", "cross-kind pipelines"])
def test_1024_device_llama_70b_plan_simulates(mixed_1024, which, record_property):
    if which == "mesh example":
        plan = load_plan(EXAMPLES / "plans" / "mixed-1024-llama70b.yaml", mixed_1024)
    else:
        plan = _cross_kind_pipelines(mixed_1024)
    cost = CostModel(mixed_1024, model_spec(model_config("llama-70b"), 4096))
    assert len(plan.devices()) == 1024
    start = time.perf_counter()
    result = simulate_plan(plan, mixed_1024, cost)
    took_s = time.perf_counter() - start
    record_property("simulate_s", took_s)
    print(f"\n{which}: 1,024 devices, {len(plan.micro_batches)} micro-batches, "
          f"{len(result.events)} trace events: simulated in {took_s:.2f} s; "
          f"step {result.step_s:.2f} s, {result.tokens_per_s:,.0f} tokens/s, "
          f"exposed comm {result.exposed_comm_s * 1e3:.0f} ms")
    assert len(result.devices) == 1024
    assert result.step_s > result.compute_only_step_s > 0
    assert {e.name for e in result.events} >= {"allreduce", "send", "recv", "optimizer"}

"""Mixed precision per kind: bf16 where the kind has it, fp16 with loss scaling where it does
not (V100), fp32 master weights; a mixed-precision run's loss curve follows the fp32 run."""

from __future__ import annotations

import json

import pytest
import torch

from hetrain.cluster import CATALOG, cluster_from_dict
from hetrain.errors import RuntimeFailure
from hetrain.plan import expand_plan
from hetrain.runtime.checkpoint import step_dir
from hetrain.runtime.faults import Faults
from hetrain.runtime.precision import LossScaler, loss_scaler, precision_of
from tests.helpers import run_plan


def test_bf16_on_a_kind_with_bf16_autocasts_to_bf16_over_fp32_masters():
    p = precision_of("bf16", CATALOG["A100-80GB"].flops)
    assert (p.param_dtype, p.compute_dtype, p.loss_scaling) == (torch.float32, torch.bfloat16,
                                                                 False)
    assert p.activation_dtype == torch.bfloat16 and p.catalog_dtype == "bf16"


def test_bf16_on_a_kind_without_bf16_becomes_fp16_with_loss_scaling():
    assert "bf16" not in CATALOG["V100"].flops
    p = precision_of("bf16", CATALOG["V100"].flops)
    assert (p.compute_dtype, p.loss_scaling) == (torch.float16, True)


def test_a_kind_without_16_bit_dtypes_stays_fp32_and_plain_settings_never_autocast():
    assert not precision_of("bf16", CATALOG["cpu"].flops).mixed
    for setting, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        p = precision_of(setting, CATALOG["A100-80GB"].flops)
        assert (p.param_dtype, p.mixed, p.activation_dtype) == (dtype, False, dtype)


def test_one_fp16_kind_turns_loss_scaling_on_for_the_whole_job():
    kinds = [CATALOG["A100-80GB"].flops, CATALOG["V100"].flops]
    assert loss_scaler("bf16", kinds).enabled
    assert not loss_scaler("bf16", kinds[:1]).enabled
    assert not loss_scaler("float32", kinds).enabled


def _params_with_grads(*grads: float) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.full((2,), g)
        params.append(p)
    return params


def test_the_scaler_grows_after_clean_steps_and_skips_a_step_that_overflowed():
    scaler = LossScaler(scale=8.0, growth_interval=2)
    params = _params_with_grads(16.0, 8.0)
    assert scaler.step_ok(params, step=0) and scaler.current == 8.0
    assert [p.grad.tolist() for p in params] == [[16.0, 16.0], [8.0, 8.0]]  # the recipe unscales
    assert scaler.step_ok(_params_with_grads(1.0), step=1)
    assert scaler.scale == 16.0  # two clean steps: doubled
    bad = _params_with_grads(1.0, float("inf"))
    assert not scaler.step_ok(bad, step=2)
    assert all(p.grad is None for p in bad) and scaler.scale == 8.0 and scaler.skipped == [2]
    # a ZeRO-1 sum waiting for its step counts too
    assert not scaler.step_ok(_params_with_grads(1.0), 3, [torch.tensor([float("nan")])])
    assert not LossScaler(enabled=False).skipped and LossScaler(enabled=False).current == 1.0


def _bf16_and_fp16_kinds():
    """Two catalog kinds emulated on CPU workers: A100 computes in bf16, V100 (no bf16) in
    fp16 with loss scaling, in one job whose gradients are summed across both."""
    return cluster_from_dict({
        "name": "bf16-and-fp16",
        "kinds": {"A100-80GB": {"mode": "emulated"}, "V100": {"mode": "emulated"}},
        "nodes": [{"name": "a", "kind": "A100-80GB", "count": 2},
                  {"name": "v", "kind": "V100", "count": 1}]})


@pytest.mark.slow
def test_a_bf16_run_follows_the_fp32_loss_curve_within_3_percent():
    cluster = _bf16_and_fp16_kinds()
    # A pipeline of two A100 stages (activations cross in bf16) beside a V100 holding all
    # layers (fp16): every layer's gradient is summed across the two kinds.
    plan = expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "A100-80GB", "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "V100", "layers": [0, 6]}]}]}, cluster)
    fp32 = run_plan(cluster, plan, steps=20, precision="float32", lr=3e-3)
    mixed = run_plan(cluster, plan, steps=20, precision="bf16", lr=3e-3)
    assert mixed.per_kind["A100-80GB"]["dtype"] == "bf16"
    assert mixed.per_kind["V100"]["dtype"] == "fp16"
    assert fp32.losses[-1] < 0.8 * fp32.losses[0]  # it learns, so the curves say something
    for want, got in zip(fp32.losses, mixed.losses, strict=True):
        assert got == pytest.approx(want, rel=0.03)
    assert mixed.losses != fp32.losses  # it did compute in 16 bits


@pytest.mark.slow
def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path):
    """The V100 computes in fp16 under loss scaling from 2**20: steps 0 and 1 overflow and
    halve the scale. A run stopped at step 3 and resumed from the checkpoint of step 2 scales,
    skips and trains exactly as the unbroken run (restarting from 2**20 would skip step 2)."""
    cluster = _bf16_and_fp16_kinds()
    plan = expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "n_layers": 6,
                        "data_parallel": [{"kind": "A100-80GB", "samples": 4},
                                          {"kind": "V100", "samples": 2}]}, cluster)
    cfg = {"precision": "bf16", "lr": 3e-3, "loss_scale": 2.0**20}
    whole = run_plan(cluster, plan, steps=4, **cfg)
    assert whole.skipped_steps[:2] == [0, 1]  # the premise: the scale moved by step 2
    ckpt = {"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every": 2}
    with pytest.raises(RuntimeFailure):
        run_plan(cluster, plan, steps=4, faults=Faults(step=3), **ckpt, **cfg)
    meta = json.loads((step_dir(tmp_path / "ckpt", 2) / "meta.json").read_text())
    assert meta["loss_scale"] == {"scale": 2.0**18, "good_steps": 0}
    resumed = run_plan(cluster, plan, steps=4, **ckpt, **cfg)
    assert [r.step for r in resumed.records] == [2, 3]
    assert resumed.skipped_steps == [s for s in whole.skipped_steps if s >= 2]
    assert resumed.losses == whole.losses[2:]
    for name, value in whole.params.items():
        assert torch.equal(resumed.params[name], value), name


@pytest.mark.slow
def test_fp16_with_sharded_optimizer_and_clipping():
    """Loss scaling under ZeRO-1 (its pieces wait for the overflow check) and clipping: the
    sharded run skips the steps the unsharded one skips and follows it; the clipped norm is
    the true gradients' (the float32 run's), not the scaled ones'."""
    cluster = _bf16_and_fp16_kinds()
    raw = {"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "n_layers": 6,
           "data_parallel": [{"kind": "A100-80GB", "samples": 4}, {"kind": "V100", "samples": 2}]}
    cfg = {"lr": 3e-3, "grad_clip": 0.5, "loss_scale": 2.0**18}
    plain = run_plan(cluster, expand_plan(raw, cluster), steps=5, precision="bf16", **cfg)
    zero = run_plan(cluster, expand_plan({**raw, "sharded_optimizer": True}, cluster), steps=5,
                    precision="bf16", **cfg)
    fp32 = run_plan(cluster, expand_plan(raw, cluster), steps=5, precision="float32", **cfg)
    assert plain.skipped_steps and plain.skipped_steps == zero.skipped_steps
    assert zero.losses == pytest.approx(plain.losses, rel=1e-4)
    clean = [s for s in range(5) if s not in plain.skipped_steps]
    assert 0 in clean and all(plain.records[s].clipped for s in clean)  # clipping acted
    # step 0: the same weights and samples in both precisions, so the same norm within 16-bit
    # rounding (the scaled gradients' norm would be 2**18 times larger)
    assert plain.records[0].grad_norm == pytest.approx(fp32.records[0].grad_norm, rel=0.05)
    for s in clean:
        assert zero.records[s].grad_norm == pytest.approx(plain.records[s].grad_norm, rel=1e-4)

"""The training recipe (runtime/recipe.py): warm-up + cosine, decay on matrices only, global-norm
clipping computed once over every weight, equal to one-process training (float64, rtol 1e-5)
under a pipeline with uneven data parallelism and a TP stage, and under ZeRO-1; a run resumed
mid-schedule equals an uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hetrain.cluster import load_cluster
from hetrain.errors import RuntimeFailure
from hetrain.plan import expand_plan
from hetrain.runtime.checkpoint import step_dir
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.faults import Faults
from hetrain.runtime.recipe import (
    active_dropout,
    adamw,
    clip_coefficient,
    decays,
    lr_at,
    step_seed,
)
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, assert_params_match_reference, run_plan

# Norms of tiny-tied's first steps under RECIPE are about 2.7 then 3.3-3.9: a limit of 3
# leaves step 0 alone and clips later ones.
RECIPE = {"lr": 3e-3, "warmup_steps": 2, "lr_schedule": "cosine", "min_lr": 3e-4,
          "weight_decay": 0.1, "grad_clip": 3.0}


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def test_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, steps=12, warmup_steps=2, lr_schedule="cosine", min_lr=0.1)
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # decays every step
    assert lrs[-1] > 0.1
    assert math.isclose(lr_at(cfg, cfg.steps), 0.1)  # the floor, just past the last step
    assert math.isclose(lr_at(cfg, 7), 0.1 + 0.45 * (1 + math.cos(math.pi / 2)))  # halfway
    flat = TrainConfig(lr=1.0, steps=5, warmup_steps=0)
    assert [lr_at(flat, s) for s in range(5)] == [1.0] * 5


def test_no_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = adamw(TrainConfig(weight_decay=0.5), [(p, decays(p)) for p in model.parameters()])
    by_decay = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert by_decay == {0.5: 1, 0.0: 3}  # the linear's weight; its bias and the norm's two


def test_clip_coefficient_and_seeds():
    cfg = TrainConfig(grad_clip=2.0)
    assert clip_coefficient(cfg, 1.0) == 1.0
    assert math.isclose(clip_coefficient(cfg, 4.0), 0.5, rel_tol=1e-5)
    assert clip_coefficient(TrainConfig(), 1e9) == 1.0
    seeds = {step_seed(0, r, s) for r in range(3) for s in range(3)}
    assert len(seeds) == 9 and step_seed(0, 1, 2) == step_seed(0, 1, 2)
    assert active_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))) == ["1"]
    assert active_dropout(nn.Sequential(nn.Dropout(0.0))) == []


def _clipped_some(result) -> None:
    clipped = [r.clipped for r in result.records]
    assert any(clipped) and not all(clipped), [r.grad_norm for r in result.records]
    assert [r.lr for r in result.records] == [
        lr_at(TrainConfig(steps=len(clipped), **RECIPE), s) for s in range(len(clipped))]


@pytest.mark.slow
def test_clipping_under_a_pipeline_with_uneven_data_parallelism_and_tp(cluster):
    """Tied embeddings (held by first and last stages), TP-2 holders summing shard by shard
    (replicated norms counted once) and with TP-1 holders (full tensors), pipelines split
    differently with 3 and 2 micro-batches: the norm is one process's norm."""
    plan = expand_plan({"model": "tiny-tied", "seq_len": 16, "micro_batch_size": 2,
                        "pipelines": [
                            {"micro_batches": 3, "stages": [
                                {"kind": "H100", "tp": 2, "layers": [0, 3]},
                                {"kind": "A100-80GB", "tp": 2, "layers": [3, 6]}]},
                            {"micro_batches": 2, "stages": [
                                {"kind": "A100-80GB", "tp": 2, "layers": [0, 2]},
                                {"kind": "BR104", "layers": [2, 6]}]}]}, cluster)
    result = run_plan(cluster, plan, steps=4, **RECIPE)
    assert_matches_reference(result, steps=4, **RECIPE)
    _clipped_some(result)


@pytest.mark.slow
def test_clipping_with_zero1_sharded_optimizer(cluster):
    """ZeRO-1 over three kinds with uneven shard weights: pieces wait for the global norm."""
    plan = expand_plan({"model": "tiny-tied", "seq_len": 16, "micro_batch_size": 2,
                        "sharded_optimizer": True, "n_layers": 6, "data_parallel": [
                            {"kind": "H100", "samples": 4}, {"kind": "A100-80GB", "samples": 2},
                            {"kind": "BR104", "samples": 4}]}, cluster)
    result = run_plan(cluster, plan, steps=4, **RECIPE)
    assert_matches_reference(result, steps=4, **RECIPE)
    _clipped_some(result)


@pytest.mark.slow
def test_resumed_mid_schedule_equals_uninterrupted(cluster, tmp_path):
    """A worker dies at step 3 of 4; the rerun resumes from the checkpoint of step 2 with the
    learning rate, AdamW state and clipping of an uninterrupted run."""
    plan = expand_plan({"model": "tiny-tied", "seq_len": 16, "micro_batch_size": 2,
                        "sharded_optimizer": True, "pipelines": [
                            {"micro_batches": 2, "stages": [
                                {"kind": "H100", "layers": [0, 3]},
                                {"kind": "A100-80GB", "layers": [3, 6]}]},
                            {"micro_batches": 1, "stages": [
                                {"kind": "BR104", "layers": [0, 6]}]}]}, cluster)
    ckpt = {"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every": 2}
    with pytest.raises(RuntimeFailure):
        run_plan(cluster, plan, steps=4, faults=Faults(step=3), **ckpt, **RECIPE)
    result = run_plan(cluster, plan, steps=4, **ckpt, **RECIPE)
    assert [r.step for r in result.records] == [2, 3]
    meta = json.loads((step_dir(tmp_path / "ckpt", 4) / "meta.json").read_text())
    assert meta["recipe"]["lr_schedule"] == "cosine" and meta["recipe"]["grad_clip"] == 3.0
    assert_params_match_reference(result.params, "tiny-tied", 4, plan.global_batch,
                                  plan.seq_len, losses=result.losses, **RECIPE)


def test_reference_clip_matches_torch():
    """The reference's clipping is torch's: a limit above every norm changes nothing."""
    from hetrain.runtime.reference import train_reference
    from tests.helpers import small_corpus

    base = {"model": "tiny", "steps": 2, "precision": "float64"}
    free, _ = train_reference(TrainConfig(**base), small_corpus(), 4, 16)
    loose, _ = train_reference(TrainConfig(**base, grad_clip=1e6), small_corpus(), 4, 16)
    tight, _ = train_reference(TrainConfig(**base, grad_clip=1e-3), small_corpus(), 4, 16)
    for name in free:
        torch.testing.assert_close(free[name], loose[name])
    assert any(not torch.equal(free[n], tight[n]) for n in free)


class DropLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 256)

    def forward(self, tokens):
        return self.out(self.drop(self.embed(tokens)))


@pytest.mark.slow
def test_two_runs_with_dropout_are_equal(three_kinds, capfd):
    """Workers draw dropout masks from (seed, rank, step): a rerun gives the same weights; the
    run says once that dropout makes it plan-dependent."""
    import copy

    import hetrain
    from tests.helpers import small_corpus

    torch.manual_seed(0)
    start = DropLM().double()
    runs = []
    for _ in range(2):
        model = copy.deepcopy(start)
        hetrain.fit(model, small_corpus(), cluster=three_kinds, steps=2, global_batch=6,
                    seq_len=16, precision="float64", time_scale=1e-9)
        runs.append(dict(model.named_parameters()))
    for name, p in runs[0].items():
        assert torch.equal(p, runs[1][name]), name
    assert any(not torch.equal(p, dict(start.named_parameters())[n]) for n, p in
               runs[0].items())
    err = capfd.readouterr().err
    assert err.count("not plan-invariant") == 2  # once per run


def test_job_file_and_flags_reach_the_recipe():
    """[optimizer] fields of a job file, and their flags, become TrainConfig's recipe."""
    from hetrain.cli.train import FLAGS
    from hetrain.runtime.job_config import job_from_dict

    job = job_from_dict({"optimizer": {"grad_clip": 1.5, "lr_schedule": "cosine",
                                       "warmup_steps": 3, "min_lr": 1e-5}})
    cfg = job.train_config()
    assert (cfg.grad_clip, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr) == (
        1.5, "cosine", 3, 1e-5)
    for flag in ("warmup_steps", "lr_schedule", "min_lr", "grad_clip", "weight_decay"):
        assert FLAGS[flag][0] == f"optimizer.{flag}"

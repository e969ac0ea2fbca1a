"""Failures: a worker killed, hung, or dying mid-checkpoint; hetrain re-plans on the surviving
kinds, resumes from the last good checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from hetrain.errors import RuntimeFailure
from hetrain.plan import expand_plan
from hetrain.planner.replan import data_parallel_replan
from hetrain.runtime.checkpoint import (
    LATEST,
    MANIFEST,
    committed_steps,
    find_latest,
    read_model,
    step_dir,
)
from hetrain.runtime.entry import train_resilient
from hetrain.runtime.failure import lost_ranks
from hetrain.runtime.faults import Faults
from hetrain.runtime.launch import train
from tests.helpers import (
    assert_params_match_reference,
    make_config,
    run_plan,
    small_corpus,
)


def pipeline_on_three_kinds(cluster, model="tiny"):
    return expand_plan({"model": model, "seq_len": 16, "micro_batch_size": 2, "pipelines": [
        {"micro_batches": 4, "stages": [{"kind": "H100", "layers": [0, 3]},
                                        {"kind": "BR104", "layers": [3, 5]},
                                        {"kind": "A100-80GB", "layers": [5, 6]}]},
    ]}, cluster)


def resilient(cluster, plan, steps, faults=None, **cfg):
    return train_resilient(cluster, plan, make_config(plan.model, steps, **cfg),
                           replan=data_parallel_replan(), corpus=small_corpus(),
                           time_scale=1e-9, faults=faults)


@pytest.mark.slow
def test_killed_worker_replanned_on_survivors_equals_straight_run(three_kinds, tmp_path):
    plan = pipeline_on_three_kinds(three_kinds)
    straight = run_plan(three_kinds, plan, steps=12)
    out = resilient(three_kinds, plan, 12, checkpoint_dir=str(tmp_path), checkpoint_every=3,
                    faults=Faults(step=7, rank=1))
    (rec,) = out.recoveries
    assert rec.lost_devices == ["br104:0"] and "exit code 13" in rec.message
    assert (rec.steps_done, rec.resumed_step, rec.steps_redone) == (7, 6, 1)
    assert rec.recovery_s is not None and rec.recovery_s > 0
    # The survivors' plan: without the lost device, same global batch. (With 8 samples the
    # cost model may leave the A100 idle: one micro-batch there would end the step later.)
    assert "br104:0" not in out.plan.devices()
    assert set(out.plan.kinds()) <= {"A100-80GB", "H100"}
    assert out.plan.global_batch == plan.global_batch
    assert len(out.losses) == 12 and not out.stopped
    # --json: every step's loss of every attempt, and the recovery.
    summary = json.loads(json.dumps(out.summary()))
    first, second = summary["attempts"]
    assert (first["first_step"], len(first["losses"])) == (0, 7)  # steps 0-6, then the loss
    assert (second["first_step"], len(second["losses"])) == (6, 6)  # resumed at 6: 6-11
    assert second["losses"][1:] == summary["losses"][7:] and "br104:0" not in second["devices"]
    assert [r["lost_devices"] for r in summary["recoveries"]] == [["br104:0"]]
    for name, want in straight.params.items():
        torch.testing.assert_close(out.params[name], want, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(torch.tensor(out.losses), torch.tensor(straight.losses),
                               rtol=1e-5, atol=1e-6)
    assert_params_match_reference(out.params, "tiny", 12, plan.global_batch, plan.seq_len)


@pytest.mark.slow
def test_death_while_writing_a_checkpoint_leaves_the_previous_one(three_kinds, tmp_path):
    plan = pipeline_on_three_kinds(three_kinds)
    with pytest.raises(RuntimeFailure, match="a100:0") as failure:
        run_plan(three_kinds, plan, steps=9, checkpoint_dir=str(tmp_path), checkpoint_every=3,
                 faults=Faults(step=6, rank=2, mode="checkpoint"))
    assert failure.value.lost_devices == ("a100:0",)
    half = tmp_path / "step-000006.tmp"
    assert half.is_dir() and not (half / MANIFEST).exists()
    assert (tmp_path / LATEST).read_text().strip() == "step-000003"
    found = find_latest(tmp_path)
    assert found.step == 3 and not found.refused  # the unfinished one is never a candidate
    params, _ = read_model(found.path)
    assert_params_match_reference(params, "tiny", 3, plan.global_batch, plan.seq_len)


@pytest.mark.slow
def test_hung_worker_is_found_by_its_peers_timeouts(three_kinds):
    # Re-planning and resuming is the same as for a dead worker (above); here: the blame.
    plan = pipeline_on_three_kinds(three_kinds)
    config = make_config(plan.model, 6, op_timeout_s=5)
    with pytest.raises(RuntimeFailure, match=r"worker 1 \(br104:0\) hung") as failure:
        train(three_kinds, plan, config, corpus=small_corpus(), time_scale=1e-9,
              faults=Faults(step=1, rank=1, mode="hang"))
    assert failure.value.lost_devices == ("br104:0",)


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(three_kinds, tmp_path):
    plan = pipeline_on_three_kinds(three_kinds)
    config = make_config("tiny", 8, checkpoint_dir=str(tmp_path), checkpoint_every=100)

    def preempt(record):
        if record.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = train_resilient(three_kinds, plan, config, replan=data_parallel_replan(),
                          corpus=small_corpus(), time_scale=1e-9,
                          progress=preempt)
    assert out.stopped and not out.recoveries
    (stopped_at,) = committed_steps(tmp_path)  # none was due: this one is SIGTERM's
    assert 3 <= stopped_at < 8 and len(out.losses) == stopped_at
    params, _ = read_model(step_dir(tmp_path, stopped_at))
    assert_params_match_reference(params, "tiny", stopped_at, plan.global_batch, plan.seq_len)


# --- which devices are lost: the launcher's rule, on stand-in processes ---------------------
def procs(*codes):
    return [SimpleNamespace(exitcode=c) for c in codes]


def test_worker_dead_without_report_is_lost(tmp_path):
    (tmp_path / "error0.txt").write_text("RuntimeFailure: receive from rank 1 failed\n")
    assert lost_ranks(procs(1, -9, None), tmp_path, grace_s=0) == [1]


def test_silent_worker_is_lost_once_peers_reported(tmp_path):
    for r in (0, 2):
        (tmp_path / f"error{r}.txt").write_text("RuntimeError: timed out\n")
    assert lost_ranks(procs(1, None, 1), tmp_path, grace_s=0.2) == [1]


def test_no_device_blamed_for_errors_everyone_reports(tmp_path):
    for r in range(3):
        (tmp_path / f"error{r}.txt").write_text("ValueError: a bug\n")
    assert lost_ranks(procs(1, 1, 1), tmp_path, grace_s=0) == []
    assert lost_ranks(procs(1, 1, 1), tmp_path / "none", grace_s=0) == []  # all died alike


def test_device_fault_in_own_report_is_lost(tmp_path):
    (tmp_path / "error0.txt").write_text("RuntimeError: CUDA error: an illegal memory access\n")
    (tmp_path / "error1.txt").write_text("RuntimeError: Connection closed by peer\n")
    assert lost_ranks(procs(1, 1), tmp_path, grace_s=0) == [0]

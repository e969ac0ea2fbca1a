"""The process around training: workers die with their launcher, the rendezvous listens on
loopback only, a stopped worker is found by its silence in seconds while a long run with
progress is never cut, a non-finite loss stops the run keeping the last good checkpoint, a full
disk is one line, and a rerun continues the folder's run exactly."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetrain.cli.bench_soak import live_children
from hetrain.errors import RuntimeFailure
from hetrain.plan import expand_plan
from hetrain.runtime import launch
from hetrain.runtime.checkpoint import LATEST, read_model, step_dir
from hetrain.runtime.faults import Faults
from hetrain.runtime.launch import WORKER_LOG, train
from hetrain.runtime.runlock import RunComplete
from tests.conftest import EXAMPLES
from tests.helpers import assert_params_match_reference, make_config, small_corpus

pytestmark = pytest.mark.slow
THREE_KINDS = EXAMPLES / "clusters" / "three-kinds.yaml"


def two_replicas(cluster):
    """Data parallelism on two kinds: two workers, 8 samples of 16 tokens a step."""
    return expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "A100-80GB", "layers": [0, 6]}]},
    ]}, cluster)


def run(cluster, plan, steps, progress=None, faults=None, **cfg):
    return train(cluster, plan, make_config(plan.model, steps, **cfg), corpus=small_corpus(),
                 time_scale=1e-9, progress=progress, faults=faults)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


PIPELINE = """model: tiny
seq_len: 16
micro_batch_size: 2
pipelines:
  - micro_batches: 2
    stages:
      - {kind: H100, layers: [0, 3]}
      - {kind: BR104, layers: [3, 5]}
      - {kind: A100-80GB, layers: [5, 6]}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_leaves_no_worker_alive(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PIPELINE)
    ckpt = tmp_path / "ckpt"
    launcher = subprocess.Popen(
        [sys.executable, "-c", "from hetrain.cli.main import main; main()", "train",
         "--cluster", str(THREE_KINDS), "--plan", str(plan), "--steps", "100000",
         "--time-scale", "1e-9", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 3 and time.monotonic() < deadline:  # three kinds: three workers
            workers = [p for p in live_children(launcher.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert len(workers) == 3, "the workers did not start"
        while not (ckpt / LATEST).exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # training (and checkpointing) is under way
        launcher.kill()
        launcher.wait()
        gone_by = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)]
    finally:
        launcher.kill()
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)


def listening(pid):
    """(address hex, port) of every TCP socket process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_rendezvous_and_workers_listen_on_loopback_only(three_kinds):
    seen = {}

    def look(record):
        if record.step == 0:
            seen["launcher"] = listening(os.getpid())
            seen["workers"] = [a for c in mp.active_children() if c.name.startswith("hetrain")
                               for a in listening(c.pid)]

    run(three_kinds, two_replicas(three_kinds), 2, progress=look)
    assert seen["launcher"], "the launcher hosts the rendezvous store"
    assert all(address in LOOPBACK for address, _ in seen["launcher"] + seen["workers"]), seen


def test_stopped_worker_is_declared_lost_within_the_hang_timeout(three_kinds):
    plan = two_replicas(three_kinds)
    stopped = {}
    suspects = []

    def stop_worker_1(record):
        if record.step == 1 and not stopped:
            (worker,) = [c for c in mp.active_children() if c.name == "hetrain-worker-1"]
            os.kill(worker.pid, signal.SIGSTOP)
            stopped["at"] = time.monotonic()

    # The op timeout (60 s) is far past the hang timeout: only the heartbeats can find it.
    config = make_config("tiny", 500, hang_timeout_s=3, op_timeout_s=60)
    with pytest.raises(RuntimeFailure, match=r"worker 1 \(a100:0\) sent no heartbeat") as lost:
        train(three_kinds, plan, config, corpus=small_corpus(), time_scale=1e-9,
              progress=stop_worker_1, on_suspect=suspects.append)
    assert time.monotonic() - stopped["at"] < 3 + 5
    assert lost.value.lost_devices == ("a100:0",)
    assert {s.rank for s in suspects} == {1}
    assert not [c for c in mp.active_children() if c.name.startswith("hetrain")]


def test_worker_stuck_after_its_report_does_not_hold_the_run(three_kinds, monkeypatch):
    # A worker whose report is written but whose process never ends (a gloo group freed under
    # the GIL can deadlock the interpreter's teardown) is killed after the exit grace.
    monkeypatch.setattr(launch, "EXIT_GRACE_S", 1.0)
    plan = two_replicas(three_kinds)
    result = run(three_kinds, plan, 2, faults=Faults(step=0, rank=1, mode="teardown"),
                 run_timeout_s=120)
    assert len(result.losses) == 2
    assert_params_match_reference(result.params, "tiny", 2, plan.global_batch, plan.seq_len)
    assert not [c for c in mp.active_children() if c.name.startswith("hetrain")]


def test_worker_killed_after_its_report_does_not_fail_the_run(three_kinds):
    # A preemption's SIGTERM forwarded as a worker finishes reaches it in its interpreter's
    # teardown, where Python has reset the handler: it dies of the signal, its part done.
    plan = two_replicas(three_kinds)
    result = run(three_kinds, plan, 2, faults=Faults(step=0, rank=1, mode="signalled"))
    assert len(result.losses) == 2
    assert_params_match_reference(result.params, "tiny", 2, plan.global_batch, plan.seq_len)


def test_long_run_with_progress_is_never_cut(three_kinds):
    # Paced steps (~0.11 s each: the emulated A100 stretched 4e4 times) keep coming: a run many
    # hang timeouts long ends normally; there is no whole-run limit.
    config = make_config("tiny", 50, hang_timeout_s=2, run_timeout_s=None)
    result = train(three_kinds, two_replicas(three_kinds), config, corpus=small_corpus(),
                   time_scale=4e4)
    assert sum(result.step_s) > 2 * 2  # the premise: steps alone outlast the limit twice
    assert len(result.losses) == 50


def test_non_finite_loss_stops_with_one_line_keeping_the_last_good_checkpoint(three_kinds,
                                                                              tmp_path):
    plan = two_replicas(three_kinds)
    with pytest.raises(RuntimeFailure, match="the loss is nan at step 3") as stop:
        run(three_kinds, plan, 6, checkpoint_dir=str(tmp_path), checkpoint_every=1,
            faults=Faults(step=3, rank=1, mode="nan"))
    line = str(stop.value)
    assert "\n" not in line and str(step_dir(tmp_path, 3)) in line
    assert stop.value.lost_devices == ()  # no device to blame: no recovery
    assert (tmp_path / LATEST).read_text().strip() == "step-000003"
    params, _ = read_model(step_dir(tmp_path, 3))
    assert_params_match_reference(params, "tiny", 3, plan.global_batch, plan.seq_len)
    assert "TrainingDiverged" in (tmp_path / WORKER_LOG).read_text()  # tracebacks kept


def test_full_disk_is_one_line_naming_the_step_folder_and_device(three_kinds, tmp_path):
    with pytest.raises(RuntimeFailure) as full:
        run(three_kinds, two_replicas(three_kinds), 4, checkpoint_dir=str(tmp_path),
            checkpoint_every=2, faults=Faults(step=2, rank=1, mode="nospace"))
    line = str(full.value)
    assert "\n" not in line
    assert f"no space left on device writing checkpoint step 2 in {tmp_path}" in line
    assert "a100:0" in line and "CheckpointException" not in line
    assert "Traceback" in (tmp_path / WORKER_LOG).read_text()


def test_rerun_continues_the_folder_run_exactly_and_a_finished_run_exits_0(three_kinds,
                                                                           tmp_path):
    plan = two_replicas(three_kinds)
    run(three_kinds, plan, 4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    again = run(three_kinds, plan, 6, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert len(again.losses) == 2  # steps 4 and 5: continued from the step-4 checkpoint
    assert_params_match_reference(again.params, "tiny", 6, plan.global_batch, plan.seq_len,
                                  losses=again.losses)
    with pytest.raises(RunComplete, match="already at step 6"):
        run(three_kinds, plan, 6, checkpoint_dir=str(tmp_path))

    from hetrain.cli.main import app

    cli = ["train", "--cluster", str(THREE_KINDS), "--steps", "2", "--global-batch", "6",
           "--seq-len", "16", "--time-scale", "1e-9", "--checkpoint-dir",
           str(tmp_path / "cli"), "--checkpoint-every", "2"]
    assert CliRunner().invoke(app, cli).exit_code == 0
    done = CliRunner().invoke(app, [*cli, "--resume"])
    assert done.exit_code == 0, done.output
    assert done.output.strip().splitlines() == [
        f"the run in {tmp_path / 'cli'} is already at step 2 (steps 2); nothing to do"]
    assert read_model(step_dir(tmp_path / "cli", 2))[1]["step"] == 2

"""Two torchrun agents on this machine (c10d rendezvous, `--nnodes 2`), each one host of the
cluster YAML: training is exact against one process with ranks placed per host; a worker
killed under `--max-restarts 1` restarts the group and the run resumes exactly from its last
checkpoint; a host lost under `--nnodes 1:2` leaves the survivors to resume exactly on their
own plan; a run folder another run owns is refused by a torchrun job."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hetrain.cluster.loading import load_cluster
from hetrain.data.loading import load_corpus
from hetrain.plan import load_plan
from hetrain.runtime.checkpoint import META, committed_steps, read_model, step_dir
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.reference import train_reference
from hetrain.runtime.runlock import read_run, run_folder
from tests.conftest import EXAMPLES
from tests.helpers import free_port

pytestmark = pytest.mark.slow
TWO_HOSTS = EXAMPLES / "clusters" / "two-hosts.yaml"
# Plan ranks interleave the hosts (host-a:0, host-b:0, host-a:1): torchrun's ranks, numbered
# host by host, never match them, so the placement is exercised. A pipeline crosses hosts.
PLAN = """model: tiny
seq_len: 16
micro_batch_size: 2
pipelines:
  - micro_batches: 2
    stages:
      - {devices: ["host-a:0"], layers: [0, 3]}
      - {devices: ["host-b:0"], layers: [3, 6]}
  - micro_batches: 1
    stages:
      - {devices: ["host-a:1"], layers: [0, 6]}
"""
HOSTS = [("host-a", 2), ("host-b", 1)]


@pytest.fixture
def job(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    # A small text of its own: the reference reads the same samples fast.
    (tmp_path / "data.txt").write_text(Path(torch.__file__).read_text() * 2)
    return tmp_path


def agents(job: Path, steps: int, time_scale: str, max_restarts: int = 0,
           elastic: bool = False) -> list:
    """One torchrun agent per host, each in its own session (killed whole). `elastic`: 1 to 2
    nodes; host-a starts first and hosts the rendezvous store (a host that goes takes the
    c10d store with it), and a lost host is given up within seconds."""
    port = free_port()
    nnodes = ["--nnodes", "1:2", "--rdzv-conf", "last_call_timeout=10,keep_alive_interval=1,"
              "keep_alive_max_attempt=2"] if elastic else ["--nnodes", "2"]
    procs = []
    for i, (host, n) in enumerate(HOSTS):
        env = {**os.environ, "HETRAIN_NODES": host, "GLOO_SOCKET_IFNAME": "lo",
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", *nnodes, "--node-rank", str(i),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
               f"test-{os.getpid()}", "--nproc-per-node", str(n), "--max-restarts",
               str(max_restarts), "--monitor-interval", "0.2", "-m", "hetrain", "train",
               "--cluster", str(TWO_HOSTS), "--plan", "plan.yaml", "--steps", str(steps),
               "--time-scale", time_scale, "--checkpoint-dir", "ckpt", "--checkpoint-every",
               "3", "--precision", "float64", "--data", "data.txt", "--out-dir", f"out-{host}"]
        with open(job / f"{host}.log", "w") as log:  # the child keeps its own copy
            procs.append(subprocess.Popen(cmd, cwd=job, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        if elastic and i == 0:
            _wait_listening(port, procs[0])
    return procs


def _wait_listening(port: int, agent: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and agent.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the rendezvous store on port {port} did not come up")


def wait_all(procs: list, job: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    for p, (host, _) in zip(procs, HOSTS, strict=False):
        code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, f"agent {host}: exit {code}\n" + (job / f"{host}.log").read_text()[-3000:]


def kill_all(procs: list) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def assert_exact(job: Path, steps: int) -> None:
    """The last checkpoint equals one-process training for `steps` (float64)."""
    params, meta = read_model(step_dir(job / "ckpt", steps))
    assert meta["step"] == steps
    config = TrainConfig(model="tiny", steps=steps, precision="float64")
    ref, _ = train_reference(config, load_corpus(str(job / "data.txt"), 0), 6, 16)
    ref = {k: v for k, v in ref.items() if k in params or k != "head.out.weight"}
    assert set(params) == set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(params[name], want, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


def reports(job: Path) -> dict[int, dict]:
    """The workers' reports by plan rank, from both hosts' out folders."""
    return {int(p.stem.removeprefix("rank")): torch.load(p, weights_only=True)
            for host, _ in HOSTS for p in (job / f"out-{host}").glob("rank*.pt")}


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if int(ppid) == pid and state != "Z":
                out.append(int(entry.name))
    return out


@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_agents_place_ranks_per_host_and_train_exactly(job):
    procs = agents(job, steps=6, time_scale="1e-9")
    try:
        wait_all(procs, job)
    finally:
        kill_all(procs)
    assert_exact(job, 6)
    plan = load_plan(job / "plan.yaml", load_cluster(TWO_HOSTS))
    by_rank = reports(job)
    # Each plan rank ran its own device, on the agent of that device's host.
    assert {r: rep["device"] for r, rep in by_rank.items()} == dict(enumerate(plan.devices()))
    for host, _ in HOSTS:
        on_host = {int(p.stem.removeprefix("rank")) for p in (job / f"out-{host}").glob("r*.pt")}
        assert {plan.devices()[r].split(":")[0] for r in on_host} == {host}
    # One run: every checkpoint names the run the folder's owner claimed.
    run_id = read_run(job / "ckpt")["run_id"]
    for step in committed_steps(job / "ckpt"):
        meta = (step_dir(job / "ckpt", step) / META).read_text()
        assert f'"run_id": "{run_id}"' in meta


def wait_first_checkpoint(procs: list, job: Path, timeout_s: float = 150) -> None:
    deadline = time.monotonic() + timeout_s
    while not committed_steps(job / "ckpt"):  # step 3: paced steps leave time to act
        assert time.monotonic() < deadline, (job / "host-a.log").read_text()[-3000:]
        assert all(p.poll() is None for p in procs), (job / "host-a.log").read_text()[-3000:]
        time.sleep(0.05)


def first_steps(job: Path) -> set[int]:
    """The first step of the last attempt's workers (0: it did not resume)."""
    return {rep["steps"][0]["step"] for rep in reports(job).values()}


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_worker_restarts_the_group_and_resumes_exactly(job):
    steps = 12
    procs = agents(job, steps=steps, time_scale="5e3", max_restarts=1)
    try:
        wait_first_checkpoint(procs, job)
        (victim,) = children(procs[1].pid)  # host-b's only worker
        os.kill(victim, signal.SIGKILL)
        wait_all(procs, job)
    finally:
        kill_all(procs)
    assert_exact(job, steps)
    # The reports are the restarted attempt's: it began at a checkpoint, not at step 0.
    (first,) = first_steps(job)
    assert 0 < first < steps and first % 3 == 0


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_lost_host_resumes_exactly_on_the_survivors_plan(job):
    steps = 12
    procs = agents(job, steps=steps, time_scale="5e3", max_restarts=1, elastic=True)
    try:
        wait_first_checkpoint(procs, job)
        _, first_meta = read_model(step_dir(job / "ckpt", committed_steps(job / "ckpt")[0]))
        os.killpg(procs[1].pid, signal.SIGKILL)  # host-b goes: its agent and its worker
        wait_all(procs[:1], job)
    finally:
        kill_all(procs)
    assert_exact(job, steps)
    devices = [d for g in first_meta["plan"]["stage_groups"] for d in g["devices"]]
    assert "host-b:0" in devices  # the first attempt ran on both hosts
    _, meta = read_model(step_dir(job / "ckpt", steps))
    survivors = [d for g in meta["plan"]["stage_groups"] for d in g["devices"]]
    assert survivors and all(d.startswith("host-a:") for d in survivors)
    (first,) = first_steps(job)
    assert 0 < first < steps and first % 3 == 0


@pytest.mark.timeout(120)
def test_torchrun_job_is_refused_a_folder_another_run_owns(job):
    cluster = load_cluster(TWO_HOSTS)
    plan = load_plan(job / "plan.yaml", cluster)
    config = TrainConfig(model="tiny", steps=4, checkpoint_dir=str(job / "ckpt"))
    with run_folder(config, plan):  # another run holds the folder
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", "3", "-m", "hetrain", "train", "--cluster", str(TWO_HOSTS),
             "--plan", "plan.yaml", "--steps", "4", "--time-scale", "1e-9",
             "--checkpoint-dir", "ckpt", "--checkpoint-every", "2", "--out-dir", "out"],
            cwd=job, capture_output=True, text=True, timeout=100,
            env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert done.returncode != 0
    assert "is in use by another run" in done.stdout + done.stderr
    assert committed_steps(job / "ckpt") == []

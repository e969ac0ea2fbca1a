"""The supervisor: train; when a device is lost, re-plan for the survivors and resume from the
last good checkpoint, without a person.

The launcher names the lost devices (died without a report, or hung past the op timeout;
see runtime/failure.py). They leave the cluster (`Cluster.without`), `replan` makes a plan
for the rest with the same global batch, so every step stays the same optimizer step, and
training resumes from the newest checkpoint that verifies. Steps since that checkpoint are
redone; the result equals an uninterrupted run.

This supervises one host's spawned workers. Across nodes, torchrun's elastic agent is the
supervisor (`--nnodes MIN:MAX --max-restarts N`): it restarts the whole worker group on any
failure; the workers then resume through the same checkpoints (`resume=True`), and the plan
for the new world comes from the same `replan` (see docs/recovery.md).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetrain.cluster.topology import Cluster
from hetrain.data.corpus import Corpus
from hetrain.errors import RuntimeFailure
from hetrain.model.source import ModelSource
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import ProgressFn, SuspectFn, check_plan, plan_spec, train
from hetrain.runtime.results import RunResult
from hetrain.runtime.runlock import run_folder

ReplanFn = Callable[[Cluster, Plan, TrainConfig], Plan]


@dataclass
class Recovery:
    """One failure and the resume that followed (times from time.time())."""

    lost_devices: list[str]
    message: str
    steps_done: int  # steps completed when the failure struck
    plan: Plan  # the plan resumed on
    last_step_at: float  # the last step before the failure completed (~ the failure)
    detected_at: float  # the launcher reported the failure
    resumed_step: int | None = None  # the checkpoint's step (None: not resumed yet)
    first_step_at: float | None = None  # the first step after the resume completed

    @property
    def steps_redone(self) -> int | None:
        return None if self.resumed_step is None else self.steps_done - self.resumed_step

    @property
    def detect_s(self) -> float:
        return self.detected_at - self.last_step_at

    @property
    def recovery_s(self) -> float | None:
        """From the failure to the first step after the resume."""
        return None if self.first_step_at is None else self.first_step_at - self.last_step_at

    def summary(self) -> dict:
        return {"lost_devices": self.lost_devices, "message": self.message,
                "steps_done": self.steps_done, "resumed_step": self.resumed_step,
                "steps_redone": self.steps_redone, "detect_s": self.detect_s,
                "recovery_s": self.recovery_s, "kinds_after": self.plan.kinds(),
                "devices_after": self.plan.devices()}


@dataclass
class Attempt:
    """One launch of the workers: the step it started at and every step's loss."""

    first_step: int
    losses: list[float] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"first_step": self.first_step, "losses": self.losses, "devices": self.devices}


@dataclass
class ResilientResult:
    result: RunResult  # of the last attempt (its losses start at the resumed step)
    losses: list[float]  # by step, of the steps run here (a redone step: its last loss)
    recoveries: list[Recovery] = field(default_factory=list)
    stopped: bool = False  # SIGTERM: checkpointed and stopped before config.steps
    attempts: list[Attempt] = field(default_factory=list)
    first_step: int = 0  # the step this run started at (> 0: it continued a checkpoint)

    def summary(self) -> dict:
        """The --json figures: the last attempt's, with the loss of every step of every
        attempt and the recoveries."""
        return {**self.result.summary(), "losses": self.losses, "first_step": self.first_step,
                "attempts": [a.summary() for a in self.attempts],
                "recoveries": [r.summary() for r in self.recoveries], "stopped": self.stopped}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.result.params

    @property
    def plan(self) -> Plan:
        return self.result.plan


class _Steps:
    """Progress hook: when each step completed, and its loss (forwards to the user's hook)."""

    def __init__(self, forward: ProgressFn | None):
        self.forward = forward
        self.loss: dict[int, float] = {}
        self.attempt: list[tuple[int, float]] = []  # (step, completed at) in this attempt
        self.attempts: list[Attempt] = []

    def start(self, plan: Plan) -> None:
        self.attempt = []
        self.attempts.append(Attempt(-1, devices=plan.devices()))

    def __call__(self, record: dict) -> None:
        self.loss[record["step"]] = record["loss"]
        self.attempt.append((record["step"], time.time()))
        if self.attempts[-1].first_step < 0:
            self.attempts[-1].first_step = record["step"]
        self.attempts[-1].losses.append(record["loss"])
        if self.forward is not None:
            self.forward(record)


def train_resilient(cluster: Cluster, plan: Plan, config: TrainConfig, *,
                    replan: ReplanFn, max_recoveries: int = 3,
                    model: ModelSource | None = None, corpus: Corpus | None = None,
                    out_dir: str | Path | None = None, progress: ProgressFn | None = None,
                    time_scale: float | None = None, on_suspect: SuspectFn | None = None
                    ) -> ResilientResult:
    """`train`, surviving up to `max_recoveries` lost devices; `replan` makes the survivors'
    plan (e.g. planner.replan.data_parallel_replan: the runtime does not import the planner).
    Checkpoints go to `config.checkpoint_dir` (a temporary folder when unset) every
    `checkpoint_every` steps."""
    scratch = None
    if not config.checkpoint_dir:
        scratch = tempfile.mkdtemp(prefix="hetrain-ckpt-")
        config = config.model_copy(update={"checkpoint_dir": scratch})
    check_plan(plan, cluster, plan_spec(plan, model))  # before the folder is claimed
    try:
        with run_folder(config, plan) as config:  # owned for every attempt
            return _supervise(cluster, plan, config, replan, max_recoveries, model,
                              corpus, out_dir, progress, time_scale, on_suspect)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _supervise(cluster: Cluster, plan: Plan, config: TrainConfig, replan: ReplanFn,
               max_recoveries: int, model: ModelSource | None, corpus: Corpus | None,
               out_dir: str | Path | None, progress: ProgressFn | None,
               time_scale: float | None, on_suspect: SuspectFn | None) -> ResilientResult:
    steps = _Steps(progress)
    recoveries: list[Recovery] = []
    attempt_config, started = config, time.time()
    with _forward_sigterm() as stopping:
        while True:
            steps.start(plan)
            try:
                result = train(cluster, plan, attempt_config, model=model,
                               corpus=corpus, out_dir=out_dir, progress=steps,
                               time_scale=time_scale, on_suspect=on_suspect)
            except RuntimeFailure as err:
                _note_resume(recoveries, steps)
                if stopping.is_set() or not err.lost_devices or \
                        len(recoveries) >= max_recoveries:
                    raise
                last = steps.attempt[-1] if steps.attempt else None
                recoveries.append(_recover(err, cluster, plan, config, replan, last,
                                           started))
                cluster = cluster.without(set(err.lost_devices))
                plan = recoveries[-1].plan
                # The fault injected for tests struck once; the survivors run clean.
                attempt_config = config.model_copy(update={"resume": True,
                                                           "fail_at_step": None})
                started = time.time()
                continue
            _note_resume(recoveries, steps)
            losses = [steps.loss[s] for s in sorted(steps.loss)]
            short = bool(steps.loss) and max(steps.loss) + 1 < config.steps
            attempts = [a for a in steps.attempts if a.first_step >= 0]
            return ResilientResult(result, losses, recoveries,
                                   stopped=stopping.is_set() or short, attempts=attempts,
                                   first_step=min(steps.loss, default=0))


def _note_resume(recoveries: list[Recovery], steps: _Steps) -> None:
    """The attempt after a recovery resumed at its first step's number."""
    if recoveries and recoveries[-1].first_step_at is None and steps.attempt:
        recoveries[-1].resumed_step, recoveries[-1].first_step_at = steps.attempt[0]


def _recover(err: RuntimeFailure, cluster: Cluster, plan: Plan, config: TrainConfig,
             replan: ReplanFn, last: tuple[int, float] | None, started: float) -> Recovery:
    detected = time.time()
    lost = set(err.lost_devices)
    if not [d for d in cluster.devices if d.id not in lost]:
        raise RuntimeFailure(f"{err}; no device is left to resume on") from err
    survivors = cluster.without(lost)
    new_plan = replan(survivors, plan, config)
    if new_plan.global_batch != plan.global_batch:
        raise RuntimeFailure(f"the re-plan changed the global batch ({plan.global_batch} -> "
                             f"{new_plan.global_batch}); steps would no longer be exact")
    return Recovery(lost_devices=sorted(lost), message=str(err),
                    steps_done=last[0] + 1 if last else 0, plan=new_plan,
                    last_step_at=last[1] if last else started, detected_at=detected)


@contextmanager
def _forward_sigterm() -> Iterator[threading.Event]:
    """SIGTERM to the supervisor goes on to the workers (which checkpoint and stop) and
    ends supervision: a stopped run is not recovered."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def on_sigterm(signum: int, frame: object) -> None:
        stopping.set()
        for child in mp.active_children():
            os.kill(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGTERM, previous)

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

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from hetrain.cluster.topology import Cluster
from hetrain.data.corpus import Corpus
from hetrain.errors import RuntimeFailure
from hetrain.model.source import ModelSource
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.faults import Faults
from hetrain.runtime.launch import (
    ProgressFn,
    ReplanFn,
    SuspectFn,
    run_attempt,
)
from hetrain.runtime.records import StepRecord
from hetrain.runtime.results import Attempt, Recovery, RunResult


class _Steps:
    """Progress hook: when each step completed, and its loss (forwards to the user's hook)."""

    def __init__(self, forward: ProgressFn | None):
        self.forward = forward
        self.loss: dict[int, float] = {}
        self.record: dict[int, StepRecord] = {}  # the last attempt's record of each step
        self.attempt: list[tuple[int, float]] = []  # (step, completed at) in this attempt
        self.attempts: list[Attempt] = []

    def start(self, plan: Plan) -> None:
        self.attempt = []
        self.attempts.append(Attempt(-1, devices=plan.devices()))

    def __call__(self, record: StepRecord) -> None:
        self.loss[record.step] = record.loss
        self.record[record.step] = record
        self.attempt.append((record.step, time.time()))
        if self.attempts[-1].first_step < 0:
            self.attempts[-1].first_step = record.step
        self.attempts[-1].losses.append(record.loss)
        self.attempts[-1].step_s.append(record.step_s)
        if self.forward is not None:
            self.forward(record)


def supervise(cluster: Cluster, plan: Plan, config: TrainConfig, replan: ReplanFn,
              max_recoveries: int, model: ModelSource | nn.Module | None, corpus: Corpus | None,
              out_dir: str | Path | None, progress: ProgressFn | None,
              time_scale: float | None, on_suspect: SuspectFn | None,
              faults: Faults | None) -> RunResult:
    """Attempts until one completes, re-planning after each lost device; the inputs are
    checked and the checkpoint folder is held by the caller."""
    steps = _Steps(progress)
    recoveries: list[Recovery] = []
    attempt_config, started = config, time.time()
    with _forward_sigterm() as stopping:
        while True:
            steps.start(plan)
            try:
                result = run_attempt(cluster, plan, attempt_config, model=model,
                                     corpus=corpus, out_dir=out_dir, progress=steps,
                                     time_scale=time_scale, on_suspect=on_suspect,
                                     faults=faults)
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
                attempt_config, faults = config.model_copy(update={"resume": True}), None
                started = time.time()
                continue
            _note_resume(recoveries, steps)
            losses = [steps.loss[s] for s in sorted(steps.loss)]
            short = bool(steps.loss) and max(steps.loss) + 1 < config.steps
            attempts = [a for a in steps.attempts if a.first_step >= 0]
            return dataclasses.replace(
                result, losses=losses, recoveries=recoveries, attempts=attempts,
                records=[steps.record[s] for s in sorted(steps.record)],
                stopped=stopping.is_set() or short, first_step=min(steps.loss, default=0))


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

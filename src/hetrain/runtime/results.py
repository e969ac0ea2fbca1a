"""RunResult: what a run measured, gathered from the workers' reports, with every step of
every attempt and every recovery (Attempt, Recovery) when devices were lost on the way."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetrain.plan.types import Plan
from hetrain.runtime.job import Job
from hetrain.runtime.records import StepRecord, WorkerReport, report_path


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
    """One launch of the workers: the step it started at, and every step's loss and time."""

    first_step: int
    losses: list[float] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {"first_step": self.first_step, "losses": self.losses, "devices": self.devices}


@dataclass
class RunResult:
    plan: Plan
    losses: list[float]
    step_s: list[float]
    tokens_per_s: float
    per_kind: dict[str, dict[str, Any]]  # figures, and "mode": "real" or "emulated"
    per_group: dict[str, dict[str, Any]]
    emulated: list[str]
    time_scale: float
    params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    events: list[dict] = field(repr=False, default_factory=list)
    late_s: float = 0.0
    first_step: int = 0  # the step this run started at (> 0: it continued a checkpoint)
    attempts: list[Attempt] = field(default_factory=list)  # one per launch of the workers
    recoveries: list[Recovery] = field(default_factory=list)
    stopped: bool = False  # SIGTERM: checkpointed and stopped before config.steps
    records: list[StepRecord] = field(repr=False, default_factory=list)  # rank 0's, this run
    kind_busy: dict[str, list[float]] = field(repr=False, default_factory=dict)  # per step
    # fp16 loss scaling: steps skipped on an overflow (the same on every rank), this run
    skipped_steps: list[int] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    @property
    def is_emulated(self) -> bool:
        return bool(self.emulated)

    def summary(self) -> dict[str, Any]:
        """The --json figures."""
        return {
            "tokens_per_s": self.tokens_per_s,
            "final_loss": self.final_loss,
            "losses": self.losses,
            "lr": [r.lr for r in self.records],
            "grad_norm": [r.grad_norm for r in self.records],
            "step_s": self.step_s,
            "per_kind": self.per_kind,
            "per_group": self.per_group,
            "emulated": self.is_emulated,
            "emulated_kinds": self.emulated,
            "modes": {kind: k["mode"] for kind, k in self.per_kind.items()},
            "time_scale": self.time_scale,
            "late_s": self.late_s,
            "global_batch": self.plan.global_batch,
            "seq_len": self.plan.seq_len,
            "first_step": self.first_step,
            "attempts": [a.summary() for a in self.attempts],
            "recoveries": [r.summary() for r in self.recoveries],
            "stopped": self.stopped,
            "skipped_steps": self.skipped_steps,
        }


def steady_step_s(step_s: list[float]) -> float:
    """Median step time, leaving out the first step (warm-up) when there are others."""
    return statistics.median(step_s[1:] if len(step_s) > 1 else step_s)


def gather_result(job: Job, out: Path, estimated_bytes: dict[str, float]) -> RunResult:
    plan = job.plan
    reports = [WorkerReport.from_saved(torch.load(report_path(out, r), weights_only=True))
               for r in range(len(job.rank_devices))]
    steps0: list[StepRecord] = reports[0].steps
    step_s = [max(rep.steps[i].step_s for rep in reports) for i in range(len(steps0))]
    losses = [rec.loss for rec in steps0]
    tokens_per_s = plan.global_batch * plan.seq_len / steady_step_s(step_s) if step_s else 0.0
    params: dict[str, torch.Tensor] = {}
    for rep in reports:
        params.update(rep.params)
    # Work share of a kind: samples x layers it computed, over the whole step's.
    total_work = plan.global_batch * max(g.layers[1] for g in plan.stage_groups)
    per_kind: dict[str, dict[str, Any]] = {}
    per_group: dict[str, dict[str, Any]] = {}
    for rep in reports:
        g = plan.group_by_name[rep.group]
        busy = [s.busy_s / s.step_s for s in rep.steps[1:] or rep.steps]
        mode = "emulated" if rep.emulated else "real"
        k = per_kind.setdefault(rep.kind, {
            "devices": 0, "share": 0.0, "busy": 0.0, "mode": mode,
            "device_type": job.torch_device_of.get(rep.device, "cpu").split(":")[0],
            "dtype": rep.dtype})
        k["devices"] += 1
        k["busy"] += statistics.mean(busy) if busy else 0.0
        if rep.tp_index == 0:
            k["share"] += rep.samples * g.n_layers / total_work
        grp = per_group.setdefault(g.name, {
            "kind": g.kind, "devices": g.devices, "layers": list(g.layers), "tp": g.tp,
            "samples": rep.samples, "estimated_bytes": estimated_bytes.get(g.name, 0.0),
            "measured_bytes": 0, "optimizer_bytes": 0, "peak_in_flight": rep.peak_in_flight,
            "emulated": rep.emulated, "mode": mode})
        # optimizer state of the group's busiest device (ZeRO-1 shards it by shard_weight)
        grp["optimizer_bytes"] = max(grp["optimizer_bytes"], rep.optimizer_bytes)
        # one steady step's peak: the device allocator's, or live storage counted on the CPU
        grp["measured_bytes"] = max(grp["measured_bytes"], rep.measured_bytes)
        grp["memory_source"] = rep.memory_source
    for k in per_kind.values():
        k["busy"] /= k["devices"]
        k["tokens_per_s"] = k["share"] * tokens_per_s
    events = [e for rep in reports for e in rep.events]
    first = steps0[0].step if steps0 else 0
    return RunResult(plan=plan, losses=losses, step_s=step_s, tokens_per_s=tokens_per_s,
                     per_kind=per_kind, per_group=per_group, emulated=sorted(job.emulated),
                     time_scale=job.time_scale, params=params, events=events,
                     late_s=max(rep.late_s for rep in reports), first_step=first,
                     attempts=[Attempt(first, losses, plan.devices(), step_s)],
                     records=list(steps0), kind_busy=_kind_busy(reports),
                     skipped_steps=list(reports[0].skipped_steps))


def _kind_busy(reports: list[WorkerReport]) -> dict[str, list[float]]:
    """Per kind, each step's busy share (compute / step time) averaged over its devices."""
    by_kind: dict[str, list[list[float]]] = {}
    for rep in reports:
        by_kind.setdefault(rep.kind, []).append(
            [s.busy_s / s.step_s if s.step_s > 0 else 0.0 for s in rep.steps])
    return {k: [statistics.mean(col) for col in zip(*rows, strict=True)]
            for k, rows in by_kind.items()}

"""RunResult: what a run measured, gathered from the workers' reports."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetrain.plan.types import Plan


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
        }


def steady_step_s(step_s: list[float]) -> float:
    """Median step time, leaving out the first step (warm-up) when there are others."""
    return statistics.median(step_s[1:] if len(step_s) > 1 else step_s)


def gather_result(job, out: Path, estimated_bytes: dict[str, float]) -> RunResult:
    plan = job.plan
    reports = [torch.load(out / f"rank{r}.pt", weights_only=True)
               for r in range(len(job.rank_devices))]
    steps0 = reports[0]["steps"]
    step_s = [max(rep["steps"][i]["step_s"] for rep in reports) for i in range(len(steps0))]
    losses = [rec["loss"] for rec in steps0]
    tokens_per_s = plan.global_batch * plan.seq_len / steady_step_s(step_s) if step_s else 0.0
    params: dict[str, torch.Tensor] = {}
    for rep in reports:
        params.update(rep["params"])
    # Work share of a kind: samples x layers it computed, over the whole step's.
    total_work = plan.global_batch * max(g.layers[1] for g in plan.stage_groups)
    per_kind: dict[str, dict[str, Any]] = {}
    per_group: dict[str, dict[str, Any]] = {}
    for rep in reports:
        g = plan.group_by_name[rep["group"]]
        busy = [s["busy_s"] / s["step_s"] for s in rep["steps"][1:] or rep["steps"]]
        mode = "emulated" if rep["emulated"] else "real"
        k = per_kind.setdefault(rep["kind"], {
            "devices": 0, "share": 0.0, "busy": 0.0, "mode": mode,
            "device_type": job.torch_device_of.get(rep["device"], "cpu").split(":")[0],
            "dtype": rep["dtype"]})
        k["devices"] += 1
        k["busy"] += statistics.mean(busy) if busy else 0.0
        if rep["tp_index"] == 0:
            k["share"] += rep["samples"] * g.n_layers / total_work
        grp = per_group.setdefault(g.name, {
            "kind": g.kind, "devices": g.devices, "layers": list(g.layers), "tp": g.tp,
            "samples": rep["samples"], "estimated_bytes": estimated_bytes.get(g.name, 0.0),
            "measured_bytes": 0, "optimizer_bytes": 0, "peak_in_flight": rep["peak_in_flight"],
            "emulated": rep["emulated"], "mode": mode})
        # optimizer state of the group's busiest device (ZeRO-1 shards it by shard_weight)
        grp["optimizer_bytes"] = max(grp["optimizer_bytes"], rep["optimizer_bytes"])
        # one steady step's peak: the device allocator's, or live storage counted on the CPU
        grp["measured_bytes"] = max(grp["measured_bytes"], rep["measured_bytes"])
        grp["memory_source"] = rep["memory_source"]
    for k in per_kind.values():
        k["busy"] /= k["devices"]
        k["tokens_per_s"] = k["share"] * tokens_per_s
    events = [e for rep in reports for e in rep["events"]]
    return RunResult(plan=plan, losses=losses, step_s=step_s, tokens_per_s=tokens_per_s,
                     per_kind=per_kind, per_group=per_group, emulated=sorted(job.emulated),
                     time_scale=job.time_scale, params=params, events=events,
                     late_s=max(rep["late_s"] for rep in reports))

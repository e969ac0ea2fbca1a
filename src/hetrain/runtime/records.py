"""Typed records a worker produces: one per step, and its report at the end of a run.

Reports cross the process boundary as plain dicts of tensors and numbers (`as_saved`), so the
launcher reads them with `torch.load(weights_only=True)`: nothing read from disk runs code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch


def report_path(out: Path, rank: int) -> Path:
    """Where rank `rank` writes its report, whole (by a rename), once its run is done: the
    launcher takes its existence for the worker's part of the run complete."""
    return out / f"rank{rank}.pt"


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as one rank saw it (the loss is the all-reduced global loss)."""

    step: int
    loss: float
    step_s: float
    busy_s: float  # computing
    sync_s: float  # waiting on the gradient sums (exposed sync)
    optimizer_s: float
    lr: float = 0.0  # the step's learning rate (runtime/recipe.py)
    grad_norm: float = 0.0  # global gradient norm before clipping
    clipped: bool = False


@dataclass
class WorkerReport:
    """What a rank measured and holds at the end of its run."""

    rank: int
    device: str
    group: str
    kind: str
    tp_index: int
    emulated: bool
    steps: list[StepRecord]
    params: dict[str, torch.Tensor]  # whole tensors by canonical name (TP rank 0 only)
    samples: int
    layers: list[int]
    measured_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    cuda_peak_bytes: int | None
    late_s: float
    events: list[dict] = field(default_factory=list)  # trace events (TraceEvent fields)
    peak_in_flight: int = 0
    dtype: str = "float32"  # the kind's compute dtype (runtime/precision.py)
    skipped_steps: list[int] = field(default_factory=list)  # fp16 loss scaling: overflowed
    memory_source: str = "estimate"  # how measured_bytes was measured

    def as_saved(self) -> dict[str, Any]:
        """Plain containers for torch.save (loadable with weights_only=True)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        saved["steps"] = [asdict(s) for s in self.steps]
        return saved

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> WorkerReport:
        return cls(**{**saved, "steps": [StepRecord(**s) for s in saved["steps"]]})

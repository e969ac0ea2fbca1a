"""TensorBoard event files of a run, written by the launcher from the workers' step records.

They go to `<run folder>/tensorboard/`: the checkpoint folder when there is one, else the
`--out-dir` folder; a run with neither writes none. Scalars, by optimizer step:
`train/loss`, `train/lr`, `train/grad_norm` (before clipping), `train/tokens_per_s`,
`busy/<kind>` (compute ÷ step time, mean over the kind's devices) and `mfu/<kind>` (model
FLOPs ÷ step time ÷ the kind's peak in the plan's dtype). The text `run/emulated` says which
kinds ran emulated: their time is paced to the catalog, not measured on the kind.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hetrain.cluster.topology import Cluster
from hetrain.model.spec import ModelSpec
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.results import RunResult

FOLDER = "tensorboard"


def events_folder(config: TrainConfig, out_dir: str | Path | None) -> Path | None:
    root = config.checkpoint_dir or out_dir
    return Path(root) / FOLDER if root else None


def kind_flops_and_peak(plan: Plan, cluster: Cluster, spec: ModelSpec
                        ) -> dict[str, tuple[float, float]]:
    """Per kind: model FLOPs of one step (forward + backward) and the peak FLOP/s of its
    devices in the plan."""
    out: dict[str, tuple[float, float]] = {}
    for g in plan.stage_groups:
        flops = plan.samples_of(g.name) * plan.seq_len * spec.flops_per_token(*g.layers)
        peak = g.tp * cluster.kinds[g.kind].peak_flops(g.dtype)
        done, total = out.get(g.kind, (0.0, 0.0))
        out[g.kind] = (done + flops, total + peak)
    return out


def write_events(folder: Path, result: RunResult, cluster: Cluster, spec: ModelSpec) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install only loses metrics
        print("hetrain: tensorboard is not installed; no event files written",
              file=sys.stderr, flush=True)
        return
    plan = result.plan
    tokens = plan.global_batch * plan.seq_len
    mfu = kind_flops_and_peak(plan, cluster, spec)
    with SummaryWriter(log_dir=str(folder)) as writer:
        writer.add_text("run/emulated", ", ".join(result.emulated) or "none (all real)")
        for i, rec in enumerate(result.records):
            step, step_s = rec.step, result.step_s[i]
            writer.add_scalar("train/loss", rec.loss, step)
            writer.add_scalar("train/lr", rec.lr, step)
            writer.add_scalar("train/grad_norm", rec.grad_norm, step)
            writer.add_scalar("train/tokens_per_s", tokens / step_s if step_s > 0 else 0.0,
                              step)
            for kind, busy in result.kind_busy.items():
                writer.add_scalar(f"busy/{kind}", busy[i], step)
            for kind, (flops, peak) in mfu.items():
                if peak > 0 and step_s > 0:
                    writer.add_scalar(f"mfu/{kind}", flops / (step_s * peak), step)

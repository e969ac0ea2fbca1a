"""The one runtime entry point, used by `hetrain train` and `hetrain.fit`.

`run_training` checks every input once (runtime/preflight.py) before anything is written,
runs as one rank when started by torchrun, else owns the checkpoint folder and spawns the
workers: supervised with re-planning when checkpoints are on (a lost device is survived),
a single attempt otherwise. It returns one RunResult holding every step of every attempt
and every recovery. Callers only build its inputs and show its result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from hetrain.cluster.topology import Cluster
from hetrain.data.corpus import Corpus
from hetrain.model.source import ModelSource
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.faults import Faults
from hetrain.runtime.launch import (
    ProgressFn,
    SuspectFn,
    check_plan,
    note_dropout,
    plan_model,
    plan_spec,
    run_attempt,
)
from hetrain.runtime.preflight import preflight
from hetrain.runtime.recovery import ReplanFn, supervise
from hetrain.runtime.results import RunResult
from hetrain.runtime.runlock import run_folder
from hetrain.runtime.torchrun import run_rank

TORCHRUN_OUT = "out/torchrun"  # the reports folder of a torchrun rank without --out-dir


@dataclass
class RunHooks:
    """What the caller sees of a run: `on_start` once every check passed and the folder is
    owned (before any worker starts), `progress` with each step, `on_suspect` when a worker
    is late with its heartbeat."""

    on_start: Callable[[], None] | None = None
    progress: ProgressFn | None = None
    on_suspect: SuspectFn | None = None


def under_torchrun() -> bool:
    """This process is one rank of a torchrun job (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_training(cluster: Cluster, plan: Plan, config: TrainConfig, *,
                 replan: ReplanFn | None = None, model: ModelSource | nn.Module | None = None,
                 corpus: Corpus | None = None, out_dir: str | Path | None = None,
                 hooks: RunHooks | None = None, time_scale: float | None = None,
                 outputs: Iterable[tuple[str | Path | None, str]] = (), cli: bool = False,
                 max_recoveries: int = 3, faults: Faults | None = None) -> RunResult | None:
    """Train `plan` for `config.steps` steps; None when this process is a torchrun rank (the
    launcher of the job gathers nothing). With `config.checkpoint_dir` and a `replan`
    (the planner's, e.g. planner.replan.data_parallel_replan), lost devices are survived.
    `outputs`: (path, option) of files the caller writes afterwards, checked first; `cli`:
    errors name options as flags. RunComplete when the folder's run is already done."""
    hooks = hooks or RunHooks()
    torchrun = under_torchrun()
    model = plan_model(plan, model)  # a user's module as the model object
    corpus = preflight(cluster, plan, config, model=model, corpus=corpus,
                       out_dir=out_dir, time_scale=time_scale, outputs=outputs, cli=cli,
                       spawn=not torchrun)
    check_plan(plan, cluster, plan_spec(plan, model), config.precision)
    if torchrun:
        # torchrun's elastic agent supervises; each rank resumes from the checkpoints.
        run_rank(cluster, plan, config, str(out_dir or TORCHRUN_OUT), replan)
        return None
    note_dropout(model)
    with run_folder(config, plan) as config:  # owned for every attempt
        if hooks.on_start is not None:
            hooks.on_start()
        if config.checkpoint_dir and replan is not None:
            return supervise(cluster, plan, config, replan, max_recoveries, model, corpus,
                             out_dir, hooks.progress, time_scale, hooks.on_suspect, faults)
        return run_attempt(cluster, plan, config, model=model, corpus=corpus,
                           out_dir=out_dir, progress=hooks.progress, time_scale=time_scale,
                           on_suspect=hooks.on_suspect, faults=faults)


def train_resilient(cluster: Cluster, plan: Plan, config: TrainConfig, *,
                    replan: ReplanFn, max_recoveries: int = 3,
                    model: ModelSource | nn.Module | None = None, corpus: Corpus | None = None,
                    out_dir: str | Path | None = None, progress: ProgressFn | None = None,
                    time_scale: float | None = None, on_suspect: SuspectFn | None = None,
                    faults: Faults | None = None) -> RunResult:
    """run_training, always supervised: surviving up to `max_recoveries` lost devices, with
    checkpoints in `config.checkpoint_dir` (a temporary folder when unset). The result holds
    every step of every attempt, and the recoveries; its figures are the last attempt's."""
    scratch = None
    if not config.checkpoint_dir:
        scratch = tempfile.mkdtemp(prefix="hetrain-ckpt-")
        config = config.model_copy(update={"checkpoint_dir": scratch})
    try:
        return run_training(cluster, plan, config, replan=replan, model=model, corpus=corpus,
                            out_dir=out_dir, hooks=RunHooks(None, progress, on_suspect),
                            time_scale=time_scale, max_recoveries=max_recoveries,
                            faults=faults)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


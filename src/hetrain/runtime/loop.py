"""What a rank runs: init torch.distributed, build its Worker, then the training loop around
Worker.run_step (resume, progress, checkpoints, a stop on a non-finite loss or parameters),
and write its report for the launcher."""

from __future__ import annotations

import math
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hetrain.errors import RuntimeFailure
from hetrain.runtime.checkpoint import load_latest, run_steps, save_checkpoint, step_dir
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.faults import before_step
from hetrain.runtime.job import Job
from hetrain.runtime.memory import PeakTracker, measuring
from hetrain.runtime.preemption import Preemption
from hetrain.runtime.records import StepRecord, report_path
from hetrain.runtime.worker import Worker


class TrainingDiverged(RuntimeFailure):
    """The loss or the parameters became NaN or infinite: training stops (no device is to
    blame, so no recovery), keeping the last good checkpoint."""


def run_worker(job: Job, rank: int, world: int, init_method: str | None = None) -> None:
    """Process entry: init torch.distributed, train, write rank{rank}.pt (or error.txt)."""
    out = Path(job.out_dir)
    torch.set_num_threads(1)
    try:
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", rank=rank, world_size=world,
                init_method=init_method or f"tcp://{job.master_addr}:{job.master_port}",
                timeout=timedelta(seconds=job.config.op_timeout_s))
        worker = Worker(job, rank)
        steps = train_loop(worker)
        worker.grad_sync.close()
        report = worker.report(steps)
        tmp = out / f".rank{rank}.pt.tmp"
        torch.save(report.as_saved(), tmp)  # plain containers: read with weights_only=True
        os.replace(tmp, report_path(out, rank))
        dist.barrier()
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, then re-raised
        (out / f"error{rank}.txt").write_text(
            f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_loop(worker: Worker) -> list[StepRecord]:
    cfg, faults = worker.job.config, worker.job.faults
    state = worker.train_state()  # what checkpoints save and restore
    start = 0
    if cfg.resume and cfg.checkpoint_dir:
        start = load_latest(state, cfg.checkpoint_dir)
    preemption = Preemption() if cfg.checkpoint_dir else None  # SIGTERM: checkpoint, then stop
    dist.barrier()  # all workers built: steps are timed from a common start
    worker.clock_offset = time.time() - time.perf_counter()
    steps = []
    for step in range(start, cfg.steps):
        before_step(faults, worker.rank, step, [p for _, _, p in worker.params])
        # seed (seed, rank, step), learning rate; ZeRO-1 waits for the overflow check (fp16)
        worker.recipe.begin(step, loss_scaling=worker.scaler.enabled)
        # Peak memory of one steady step (the second; the only one of a one-step run):
        # tracking slows every op, so it runs once.
        tracker = PeakTracker() if step - start == min(1, cfg.steps - start - 1) else None
        worker.peak = tracker or worker.peak
        worker.meter.active = tracker is not None
        with measuring(tracker, worker.state_tensors, worker.grad_sync.thread, worker.device):
            record = worker.run_step(step)
        if not math.isfinite(record.loss):  # all-reduced: every rank stops here alike
            raise TrainingDiverged(f"the loss is {record.loss} at step {step}; stopped"
                                   f"{_kept(cfg)}")
        steps.append(record)
        if worker.rank == 0 and worker.job.progress is not None:
            worker.job.progress.put(record)
        due = bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0
        stop = preemption is not None and preemption.agreed()
        if cfg.checkpoint_dir and (due or stop):
            # A checkpoint of non-finite weights would replace a good one.
            if not _parameters_finite(worker):
                raise TrainingDiverged(f"the parameters are not finite after step {step}; "
                                       f"stopped{_kept(cfg)}")
            save_checkpoint(state, cfg.checkpoint_dir, step + 1, faults)
        if stop:
            break
    return steps


def _parameters_finite(worker: Worker) -> bool:
    """Collective: whether every rank's parameters are finite."""
    ok = all(bool(torch.isfinite(p.detach()).all()) for _, _, p in worker.params)
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _kept(cfg: TrainConfig) -> str:
    if not cfg.checkpoint_dir:
        return ""
    steps = run_steps(cfg.checkpoint_dir)
    if not steps:
        return f"; no checkpoint in {cfg.checkpoint_dir} yet"
    return f"; the last good checkpoint is {step_dir(cfg.checkpoint_dir, steps[0])}"

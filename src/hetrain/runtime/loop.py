"""The training loop around Worker.run_step: resume, progress, checkpoints, a stop on a
non-finite loss or parameters, fault injection."""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from hetrain.errors import RuntimeFailure
from hetrain.runtime.memory import PeakTracker, measuring
from hetrain.runtime.preemption import Preemption
from hetrain.runtime.worker import Worker


class TrainingDiverged(RuntimeFailure):
    """The loss or the parameters became NaN or infinite: training stops (no device is to
    blame, so no recovery), keeping the last good checkpoint."""


def train_loop(worker: Worker) -> list[dict]:
    cfg = worker.job.config
    start = 0
    if cfg.resume and cfg.checkpoint_dir:
        from hetrain.runtime.checkpoint import load_latest

        start = load_latest(worker, cfg.checkpoint_dir)
    preemption = Preemption() if cfg.checkpoint_dir else None  # SIGTERM: checkpoint, then stop
    dist.barrier()  # all workers built: steps are timed from a common start
    worker.clock_offset = time.time() - time.perf_counter()
    steps = []
    for step in range(start, cfg.steps):
        _inject_fault(worker, step)
        # Peak memory of one steady step (the second; the only one of a one-step run):
        # tracking slows every op, so it runs once.
        tracker = PeakTracker() if step - start == min(1, cfg.steps - start - 1) else None
        worker.peak = tracker or worker.peak
        with measuring(tracker, worker.state_tensors, worker.grad_sync.thread, worker.device):
            record = worker.run_step(step)
        if not math.isfinite(record["loss"]):  # all-reduced: every rank stops here alike
            raise TrainingDiverged(f"the loss is {record['loss']} at step {step}; stopped"
                                   f"{_kept(cfg)}")
        steps.append(record)
        if worker.rank == 0 and worker.job.progress is not None:
            worker.job.progress.put(record)
        due = bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0
        stop = preemption is not None and preemption.agreed()
        if cfg.checkpoint_dir and (due or stop):
            from hetrain.runtime.checkpoint import save_checkpoint

            # A checkpoint of non-finite weights would replace a good one.
            if not _parameters_finite(worker):
                raise TrainingDiverged(f"the parameters are not finite after step {step}; "
                                       f"stopped{_kept(cfg)}")
            save_checkpoint(worker, cfg.checkpoint_dir, step + 1)
        if stop:
            break
    return steps


def _parameters_finite(worker: Worker) -> bool:
    """Collective: whether every rank's parameters are finite."""
    ok = all(bool(torch.isfinite(p.detach()).all()) for _, _, p in worker.params)
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _kept(cfg) -> str:  # noqa: ANN001 - TrainConfig
    if not cfg.checkpoint_dir:
        return ""
    from hetrain.runtime.checkpoint import run_steps, step_dir

    steps = run_steps(cfg.checkpoint_dir)
    if not steps:
        return f"; no checkpoint in {cfg.checkpoint_dir} yet"
    return f"; the last good checkpoint is {step_dir(cfg.checkpoint_dir, steps[0])}"


def _inject_fault(worker: Worker, step: int) -> None:
    """Fault injection for tests (TrainConfig.fail_*): a lost, hung or diverging worker."""
    cfg = worker.job.config
    if cfg.fail_at_step != step or worker.rank != cfg.fail_rank or \
            cfg.fail_mode in ("checkpoint", "nospace"):
        return
    if cfg.fail_mode == "nan":  # this rank's weights go bad: the loss of this step is NaN
        with torch.no_grad():
            worker.params[0][2].fill_(float("nan"))
        return
    if cfg.fail_mode == "hang":  # a hung device: alive, silent (its heartbeat thread beats)
        time.sleep(24 * 3600)
    os._exit(13)  # die without cleanup, like a lost device

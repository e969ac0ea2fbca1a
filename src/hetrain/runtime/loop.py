"""The training loop around Worker.run_step: resume, progress, checkpoints, fault injection."""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from hetrain.runtime.preemption import Preemption
from hetrain.runtime.worker import Worker


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
        if cfg.fail_at_step == step and worker.rank == cfg.fail_rank and \
                cfg.fail_mode != "checkpoint":
            if cfg.fail_mode == "hang":  # a hung device: alive, silent
                time.sleep(cfg.run_timeout_s)
            os._exit(13)  # fault injection for tests: die without cleanup, like a lost device
        record = worker.run_step(step)
        steps.append(record)
        if worker.rank == 0 and worker.job.progress is not None:
            worker.job.progress.put(record)
        due = bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0
        stop = preemption is not None and preemption.agreed()
        if cfg.checkpoint_dir and (due or stop):
            from hetrain.runtime.checkpoint import save_checkpoint

            save_checkpoint(worker, cfg.checkpoint_dir, step + 1)
        if stop:
            break
    return steps

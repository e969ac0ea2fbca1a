"""Plain `DistributedDataParallel` on the CPU: the yardstick for hetrain's own overhead.

The same model, global batch, samples and optimizer as a hetrain data-parallel run on real
CPU workers (even shares), so the two step times differ only by what hetrain adds."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import sys
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from hetrain.data.corpus import Corpus
from hetrain.errors import RuntimeFailure
from hetrain.model.config import model_config
from hetrain.model.decoder import build_decoder
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.precision import param_dtype
from hetrain.runtime.rendezvous import LOOPBACK, LoopbackStore, gloo_on_loopback
from hetrain.runtime.watchdog import die_with_parent


def _ddp_worker(rank: int, world: int, port: int, config: TrainConfig, corpus: Corpus,
                global_batch: int, seq_len: int, queue, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # as hetrain's workers: no orphan outlives the bench
    gloo_on_loopback()
    torch.set_num_threads(1)
    timeout = timedelta(seconds=config.op_timeout_s)
    store = dist.TCPStore(LOOPBACK, port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        model = build_decoder(model_config(config.model), config.seed)
        model.to(param_dtype(config.precision))
        # The decoder's buffers (rotary tables) are constants: broadcasting them every step
        # would charge DDP for work hetrain does not do. (torch 2.13 warns that the flag is
        # deprecated and itself says to keep it until its replacement exists.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*",
                                    category=FutureWarning)
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.AdamW(ddp.parameters(), lr=config.lr,
                                weight_decay=config.weight_decay, foreach=False)
        share = global_batch // world
        rows = slice(rank * share, (rank + 1) * share)
        steps_s, losses = [], []
        for step in range(config.steps):
            t0 = time.perf_counter()
            inputs, targets = corpus.global_batch(step, global_batch, seq_len)
            logits = ddp(inputs[rows])
            loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            # hetrain ends its step with the global loss's all-reduce; so does this.
            total = loss.detach().double()
            dist.all_reduce(total)
            steps_s.append(time.perf_counter() - t0)
            losses.append(float(total) / world)
        queue.put((rank, steps_s, losses))
        queue.close()
        queue.join_thread()  # the figures are in the pipe before the exit below
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the launcher sees the exit code, stderr the cause
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Skip the interpreter's teardown: freeing DDP's reducer drops the last reference to its
    # gloo group while holding the GIL, and the group's destructor joins gloo's work thread,
    # which needs the GIL to free its last work's tensors: a deadlock in about 1 run in 25.
    os._exit(0)


def ddp_run(config: TrainConfig, corpus: Corpus, global_batch: int, seq_len: int,
            world: int = 2) -> tuple[list[float], list[float]]:
    """Per-step seconds (slowest rank) and losses of plain DDP over `world` CPU processes."""
    if global_batch % world:
        raise RuntimeFailure(f"global batch {global_batch} does not split evenly over {world} "
                             "DDP workers; use a multiple")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = LoopbackStore(world, config.op_timeout_s)  # as hetrain's: 127.0.0.1 only
    procs = [ctx.Process(target=_ddp_worker, daemon=True,
                         args=(r, world, store.port, config, corpus, global_batch, seq_len,
                               queue, os.getpid()))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = _collect(procs, queue, config.run_timeout_s or 3600.0)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        store.close()
    by_rank = {r: (s, losses) for r, s, losses in results}
    step_s = [max(by_rank[r][0][i] for r in by_rank) for i in range(config.steps)]
    return step_s, by_rank[0][1]


def _collect(procs, queue, timeout_s: float) -> list:
    results: list = []
    deadline = time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=0.2))
            continue
        except queue_mod.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeFailure(f"DDP baseline worker {dead[0]} died with exit code "
                                 f"{procs[dead[0]].exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"the DDP baseline did not finish within {timeout_s:.0f} s")
    return results


def steady_median_s(step_s: list[float]) -> float:
    """Median step, leaving out the first (warm-up)."""
    return statistics.median(step_s[1:] if len(step_s) > 1 else step_s)

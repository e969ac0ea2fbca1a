"""A spawned worker's guards: it dies with its launcher, listens on loopback only, beats a
heartbeat the launcher watches, and leaves its traceback in its report file, not on the
terminal.

Children of a process killed with SIGKILL keep running unless they watch their parent: on
Linux the kernel sends SIGKILL to the worker when the launcher dies (PR_SET_PDEATHSIG); a
thread that polls the parent's pid does the same elsewhere, and covers the instant between
the spawn and the prctl call.

The heartbeat is a thread, not a step counter: a worker waiting on a slow peer is alive and
beats on, a stopped or frozen process (SIGSTOP, a wedged driver, swapped out) falls silent,
so the launcher tells the suspect from its waiting peers (see launch.Heartbeats).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from hetrain.cluster.devices import bind_process
from hetrain.runtime.faults import at_exit
from hetrain.runtime.job import Job
from hetrain.runtime.loop import run_worker
from hetrain.runtime.rendezvous import gloo_on_loopback

BEAT_S = 0.5  # heartbeat period
_PR_SET_PDEATHSIG = 1


def beat_key(rank: int) -> str:
    return f"hetrain/beat/{rank}"


def supervised_worker(job: Job, rank: int, world: int, parent_pid: int) -> None:
    """Process entry of a locally spawned worker (the launcher hosts the store)."""
    die_with_parent(parent_pid)
    try:
        device_id = job.rank_devices[rank]
        if device_id in job.torch_device_of:  # a real device: its kind's plugin first
            bind_process(job.cluster.kind_of(device_id), job.torch_device_of[device_id])
        gloo_on_loopback()
        timeout = timedelta(seconds=job.config.op_timeout_s)
        store = dist.TCPStore(job.master_addr, job.master_port, world, is_master=False,
                              timeout=timeout)
        heartbeat = Heartbeat(job, rank, world)
        try:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=timeout)
            run_worker(job, rank, world)
            at_exit(job.faults, rank)
        finally:
            heartbeat.stop()  # before the interpreter exits: no store call left in flight
    except BaseException as err:  # noqa: BLE001 - the report file holds the traceback
        report = Path(job.out_dir) / f"error{rank}.txt"
        if not report.exists():
            report.write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise SystemExit(1) from None  # multiprocessing prints no traceback for SystemExit


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the polling thread below still guards
    if os.getppid() != parent_pid:  # the launcher died before the prctl call
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="hetrain-parent-watch").start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # orphaned: stop before writing anything more into the run folder


class Heartbeat:
    """A thread adding 1 to this rank's counter in the launcher's store every BEAT_S."""

    def __init__(self, job: Job, rank: int, world: int):
        # Its own connection: a store client is not shared between threads.
        self.store = dist.TCPStore(job.master_addr, job.master_port, world, is_master=False,
                                   timeout=timedelta(seconds=job.config.op_timeout_s))
        self.key = beat_key(rank)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="hetrain-heartbeat")
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopping.is_set():
            # A store error: the launcher is going, and the parent watch ends this process.
            with contextlib.suppress(Exception):
                self.store.add(self.key, 1)
            self.stopping.wait(BEAT_S)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

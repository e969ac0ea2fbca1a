"""Fault injection for tests: a worker that dies, hangs, diverges, or fails its checkpoint.

Kept out of the users' settings and out of the training code: a run carries `Faults` only
when a test (or `hetrain bench recovery`) gives it, and the loop and the checkpoint writer
call the hooks below only then, so a production run has no fault path at all.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp

FaultMode = Literal["exit", "hang", "checkpoint", "nan", "nospace", "teardown", "signalled"]


@dataclass(frozen=True)
class Faults:
    """Rank `rank` exits at the start of step `step` (mode "exit"), hangs there ("hang"), gets
    NaN weights at that step ("nan"), dies while writing the checkpoint of step `step`
    ("checkpoint"), or finds its disk full writing it ("nospace"); or, its report written,
    never ends its process ("teardown", any step) or is killed by a signal ("signalled": a
    SIGTERM as its interpreter's teardown has reset the handlers)."""

    step: int
    rank: int = 0
    mode: FaultMode = "exit"

    def strikes(self, rank: int, step: int, *modes: str) -> bool:
        return self.step == step and self.rank == rank and self.mode in modes


def before_step(faults: Faults | None, rank: int, step: int,
                params: list[torch.Tensor]) -> None:
    """At the start of a step: a lost, hung or diverging worker."""
    if faults is None or not faults.strikes(rank, step, "exit", "hang", "nan"):
        return
    if faults.mode == "nan":  # this rank's weights go bad: the loss of this step is NaN
        with torch.no_grad():
            params[0].fill_(float("nan"))
        return
    if faults.mode == "hang":  # a hung device: alive, silent (its heartbeat thread beats)
        time.sleep(24 * 3600)
    os._exit(13)  # die without cleanup, like a lost device


def at_exit(faults: Faults | None, rank: int) -> None:
    """After this rank's report is written: stuck in its interpreter's teardown, or killed
    there."""
    if faults is None or faults.rank != rank:
        return
    if faults.mode == "teardown":
        time.sleep(24 * 3600)
    if faults.mode == "signalled":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # (the signal ends the process first)


def checkpoint_writer(faults: Faults | None, rank: int, step: int,
                      tmp: Path) -> dcp.FileSystemWriter:
    """The DCP writer of a checkpoint: a full disk when the fault says so."""
    if faults is not None and faults.strikes(rank, step, "nospace"):
        return _FullDiskWriter(tmp, sync_files=True)
    return dcp.FileSystemWriter(tmp, sync_files=True)


def while_writing(faults: Faults | None, rank: int, step: int, tmp: Path) -> None:
    """After this rank's checkpoint data is written: die with its file half written, before
    the commit."""
    if faults is None or not faults.strikes(rank, step, "checkpoint"):
        return
    for path in tmp.glob(f"__{rank}_*.distcp"):
        os.truncate(path, path.stat().st_size // 2)
    os._exit(13)


class _FullDiskWriter(dcp.FileSystemWriter):
    """This rank's disk is full."""

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201 - DCP's signature
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

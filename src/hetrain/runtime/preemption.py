"""SIGTERM (a scheduler's preemption, torchrun's agent stopping the group): finish the step,
checkpoint, stop. The signal may reach only some workers, so they agree after each step."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class Preemption:
    """Installs a SIGTERM handler in this worker (main thread only) that sets a flag."""

    def __init__(self) -> None:
        self.requested = False
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Collective: whether any worker was asked to stop (every worker gets the same)."""
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

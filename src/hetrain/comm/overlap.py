"""Overlap of collectives with compute: one thread per rank issues them in submission order,
on process groups that the compute thread never uses (so every group sees one order)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from queue import SimpleQueue


class CommThread:
    """One thread per rank that issues the sync collectives, in submission order."""

    def __init__(self):
        self._tasks: SimpleQueue = SimpleQueue()
        # Entered around each task: memory tracking (runtime/memory.py) follows the work here.
        self.context: Callable[[], AbstractContextManager] = nullcontext
        threading.Thread(target=self._loop, daemon=True, name="hetrain-sync").start()

    def submit(self, fn: Callable[[], None]) -> Future:
        fut: Future = Future()
        self._tasks.put((fn, fut))
        return fut

    def close(self) -> None:
        self._tasks.put((None, None))

    def _loop(self) -> None:
        while True:
            fn, fut = self._tasks.get()
            if fn is None:
                return
            try:
                with self.context():
                    result = fn()
                fut.set_result(result)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                fut.set_exception(err)

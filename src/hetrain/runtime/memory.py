"""Measured memory of a worker: its peak of live tensor storage during one step (PeakTracker,
what the memory model of cost/model.py is checked against), and the breakdown: model states
from the real tensors, activations from what autograd saves, per micro-batch in flight."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + gradients (same size) + optimizer states, as allocated."""
    weights = sum(_nbytes(p) for p in module.parameters())
    states = sum(_nbytes(v) for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))
    return 2 * weights + states


class ActivationMeter:
    """Bytes saved for backward by micro-batches in flight; `peak_bytes` is the maximum."""

    def __init__(self):
        self.in_flight: dict[int, int] = {}
        self.peak_bytes = 0
        # Counting runs a Python hook per saved tensor: the loop turns it on for the one
        # steady step whose peak it measures (loop.train_loop), as for PeakTracker.
        self.active = False

    @contextmanager
    def forward(self, micro_batch: int):
        if not self.active:
            yield
            return
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            local = t.to_local() if hasattr(t, "to_local") else t
            key = local.untyped_storage().data_ptr() if local.device.type != "meta" else id(t)
            if key not in seen and not isinstance(t, nn.Parameter):
                seen.add(key)
                total += local.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.in_flight[micro_batch] = total
        self.peak_bytes = max(self.peak_bytes, sum(self.in_flight.values()))

    def release(self, micro_batch: int) -> None:
        self.in_flight.pop(micro_batch, None)


class PeakTracker:
    """Peak bytes of tensor storage alive in this process while tracking, on any device:
    what `torch.cuda.max_memory_allocated` counts on a GPU, for devices (the CPU) whose
    allocator keeps no such figure.

    Every storage an aten op creates (factories, outputs, autograd's gradients, buffers of
    collectives) is counted from the op's return until the storage is freed (a weak
    reference's callback), through a TorchDispatchMode entered in each thread that computes:
    the compute thread and, through CommThread.context, the comm thread. Storages alive when
    tracking starts are counted once registered (`hold`). Not counted: memory allocated
    outside aten ops (the collective libraries' own buffers, Python objects) and the
    allocator's rounding and fragmentation."""

    def __init__(self):
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # storage cdata -> (ref, bytes)
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.source = "storage"  # or "allocator": measuring() read the device's statistics

    def hold(self, tensors) -> None:  # noqa: ANN001 - an iterable of tensors (or None)
        """Count `tensors`' storages as alive from now on (each storage once)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def mode(self) -> TorchDispatchMode:
        """A dispatch mode that counts what ops create; enter one per thread."""
        return _CountingMode(self)

    def _add(self, t: torch.Tensor) -> None:
        local = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
        if local.device.type == "meta":
            return
        storage = local.untyped_storage()
        key = storage._cdata
        with self._lock:
            if key in self._live:
                return
            nbytes = storage.nbytes()
            self._live[key] = (weakref.ref(storage, lambda _, k=key: self._free(k)), nbytes)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.live_bytes -= entry[1]


def held_tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What a worker keeps between steps: weights, gradients, buffers, optimizer state."""
    out = [t for p in module.parameters() for t in (p, p.grad) if t is not None]
    out += list(module.buffers())
    out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


@contextmanager
def measuring(tracker: PeakTracker | None, held: Callable[[], list[torch.Tensor]],
              comm_thread=None, device: torch.device | None = None):  # noqa: ANN001
    """Track peak memory inside the block (None: no tracking) into `tracker.peak_bytes`. On
    an accelerator whose torch module keeps allocator statistics (cuda, npu, xpu, ...) that
    is the allocator's peak; elsewhere (the CPU) the storages counted: `held()` (alive
    already) and what the compute thread and `comm_thread` (a CommThread) allocate."""
    if tracker is None:
        yield
        return
    allocator = _allocator_stats(device)
    if allocator is not None:
        allocator.reset_peak_memory_stats(device)
        yield
        tracker.peak_bytes = allocator.max_memory_allocated(device)
        tracker.source = "allocator"
        return
    tracker.hold(held())
    if comm_thread is not None:
        comm_thread.context = tracker.mode
    try:
        with tracker.mode():
            yield
    finally:
        if comm_thread is not None:
            comm_thread.context = nullcontext



def _allocator_stats(device: torch.device | None):  # noqa: ANN202 - a torch device module
    if device is None or device.type == "cpu":
        return None
    try:
        module = torch.get_device_module(device.type)
    except (RuntimeError, AttributeError, ValueError):
        return None
    ok = hasattr(module, "max_memory_allocated") and hasattr(module, "reset_peak_memory_stats")
    return module if ok else None


class _CountingMode(TorchDispatchMode):
    def __init__(self, tracker: PeakTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        # Views and in-place results alias an input: nothing new (and a view of a storage
        # that tracking did not see start, such as the corpus, is not this step's memory).
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage_key(t) not in inputs:
                self.tracker._add(t)
        return out


def _storage_key(t: torch.Tensor) -> int:
    local = getattr(t, "_local_tensor", t)
    return 0 if local.device.type == "meta" else local.untyped_storage()._cdata

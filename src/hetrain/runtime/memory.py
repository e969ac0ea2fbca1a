"""Measured memory of a worker: model states from the real tensors, activations from the
tensors autograd saves for backward, per micro-batch in flight."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


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

    @contextmanager
    def forward(self, micro_batch: int):
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

"""The one owner of process groups. torch.distributed requires every rank to create every
group in the same order, so callers enumerate the same rank lists on all ranks."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

BRIDGE_BACKEND = "gloo"  # host-memory bridge between kinds


def torch_backend(native: str, device_type: str) -> str:
    """The backend torch can run for a kind's native library on this machine.

    On a CUDA device NCCL (or RCCL, which ROCm builds of torch expose as "nccl") is real.
    Emulated kinds run on CPU, where only gloo exists; the kind's own library name (hccl,
    bccl, cncl) is kept for reports."""
    if device_type == "cuda" and native in ("nccl", "rccl") and dist.is_nccl_available():
        return "nccl"
    return "gloo"


class GroupCache:
    def __init__(self, timeout_s: float):
        self.timeout = timedelta(seconds=timeout_s)
        self._groups: dict[tuple[tuple[int, ...], str], object] = {}

    def get(self, ranks: list[int] | tuple[int, ...], backend: str = "gloo"):
        """The group over `ranks` (created on first call, on every rank); None for one rank
        or when this rank is not a member."""
        key = (tuple(sorted(ranks)), backend)
        if len(key[0]) < 2:
            return None
        if key not in self._groups:
            self._groups[key] = dist.new_group(list(key[0]), backend=backend,
                                               timeout=self.timeout)
        group = self._groups[key]
        return group if dist.get_rank() in key[0] else None

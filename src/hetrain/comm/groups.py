"""The one owner of process groups. torch.distributed requires every rank to create every
group in the same order, so callers enumerate the same rank lists on all ranks."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from hetrain.cluster.devices import backend_available

BRIDGE_BACKEND = "gloo"  # host-memory bridge between kinds


def torch_backend(native: str | None, device: str) -> str:
    """The torch.distributed backend for a kind's group on `device` ("cuda:0", "npu:1", "cpu").

    On the kind's own device it is the backend its plugin registers (nccl, also RCCL on ROCm;
    hccl, cncl, mccl, xccl); emulated kinds run on the CPU, where gloo is the one backend. The
    launcher has already refused a real kind whose backend is missing, so the fallback to gloo
    only serves kinds whose backend is unknown."""
    device_type = device.split(":")[0]  # "npu:1" parses in torch only once torch_npu is in
    if device_type == "cpu" or not backend_available(native):
        return BRIDGE_BACKEND
    return native


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

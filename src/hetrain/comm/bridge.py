"""Which torch.distributed backend carries each transfer, and the host staging of the bridge.

Inside a kind, tensors move on the kind's own backend, device to device (NCCL send/recv
between CUDA GPUs, HCCL between Ascends, ...). Between kinds, or where a kind has no device
backend here (emulated kinds run on the CPU), they cross the bridge: through host memory, on
the cluster's `bridge_backend` (gloo by default; any backend registered in the process, e.g.
a cross-vendor library's plugin named by `bridge_plugin`).

Host staging (HostStager): a device tensor is copied into pinned host memory on a copy
stream, asynchronously; the compute stream does not wait, and the copy of one message runs
while the bridge still sends the one before. Received bytes go back to the device the same
way, the compute stream waiting on the copy only.
"""

from __future__ import annotations

import torch

from hetrain.cluster.devices import backend_available, plugin_problem
from hetrain.errors import ClusterError

DEFAULT_BRIDGE = "gloo"


def bridge_problem(backend: str, plugin: str | None = None) -> str | None:
    """Why `backend` cannot serve as the bridge here; None when it can."""
    problem = plugin_problem(plugin)
    if problem is not None:
        return f"its plugin {plugin!r} {problem}"
    if not backend_available(backend):
        return f"torch.distributed has no backend {backend!r} registered in this process"
    return None


def require_bridge(backend: str, plugin: str | None = None) -> None:
    """ClusterError (one line, before any worker starts) when the bridge cannot run."""
    problem = bridge_problem(backend, plugin)
    if problem is not None:
        raise ClusterError(f"bridge_backend {backend!r} is not available: {problem}; install "
                           "it (bridge_plugin: MODULE imports a plugin first) or use "
                           f"bridge_backend: {DEFAULT_BRIDGE}")


def pair_backend(src_kind: str, dst_kind: str, native: dict[str, str], bridge: str) -> str:
    """The backend of a transfer between a rank of `src_kind` and one of `dst_kind`.
    `native`: each kind's backend here (comm.groups.torch_backend: gloo for emulated kinds).
    Two devices of one kind with a device backend talk directly; anything else crosses the
    host bridge."""
    if src_kind == dst_kind and native.get(src_kind, DEFAULT_BRIDGE) != DEFAULT_BRIDGE:
        return native[src_kind]
    return bridge


def on_device(backend: str) -> bool:
    """Whether tensors for `backend` stay on the device (every backend but the host ones)."""
    return backend not in HOST_BACKENDS


HOST_BACKENDS = {"gloo", "mpi", "ucc"}  # take host tensors (ucc/mpi: in their CPU builds)


class HostStager:
    """Device <-> pinned host copies on a side stream of `device` (a no-op on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.module = None if device.type == "cpu" else torch.get_device_module(device.type)
        self.stream = self.module.Stream(device) if self.module is not None else None

    def to_host(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`tensor`'s bytes on the host (into `out` if given), ready once this returns."""
        if self.module is None:
            return tensor if out is None else out.copy_(tensor)
        out = out if out is not None else torch.empty(tensor.shape, dtype=tensor.dtype,
                                                      pin_memory=True)
        # the copy waits for the compute that produced the tensor, not the other way round
        self.stream.wait_stream(self.module.current_stream(self.device))
        with self.module.stream(self.stream):
            out.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)
        self.stream.synchronize()  # this host thread waits; the compute stream goes on
        return out

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A device copy of `host`; the compute stream waits for it, this thread does not."""
        if self.module is None:
            return host.to(self.device, copy=True)
        with self.module.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
        self.module.current_stream(self.device).wait_stream(self.stream)
        dev.record_stream(self.module.current_stream(self.device))
        return dev


def pinned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host buffer for bytes bound to or from `device`: pinned when it is an accelerator
    (page-locked memory is what asynchronous copies need)."""
    pin = device.type != "cpu"
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def pair_groups(pairs: list[tuple[int, int]], kind_of_rank: dict[int, str],
                native: dict[str, str], bridge: str, cache, me: int  # noqa: ANN001
                ) -> dict[int, tuple[object | None, str]]:
    """This rank's peers -> (process group, backend) of their transfers. Call on EVERY rank
    with the same `pairs` (groups are created in one order everywhere). Pairs on gloo use the
    default group (None), as every rank starts on gloo."""
    out: dict[int, tuple[object | None, str]] = {}
    for a, b in sorted({tuple(sorted(p)) for p in pairs if p[0] != p[1]}):
        backend = pair_backend(kind_of_rank[a], kind_of_rank[b], native, bridge)
        group = None if backend == DEFAULT_BRIDGE else cache.get([a, b], backend)
        if me in (a, b):
            out[b if me == a else a] = (group, backend)
    return out

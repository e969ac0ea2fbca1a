"""Point-to-point transfers between pipeline stages, explicit and staged through host memory.

batch_isend_irecv over gloo has hung under pipelining (PiPPy #1130, pytorch #132644), so
sends are plain isend of CPU tensors, receives wait with a timeout, and each message is
tagged by micro-batch and direction. Each message carries its send time (an 8-byte header),
so that a receive over an emulated link can be held to the link's modelled duration.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from hetrain.comm.bridge import DEFAULT_BRIDGE, HostStager, on_device, pinned_empty
from hetrain.comm.pacing import LinkPacer
from hetrain.errors import RuntimeFailure

HEADER_BYTES = 8  # the send's wall-clock time, one float64


def tag_of(micro_batch: int, backward: bool) -> int:
    return 2 * micro_batch + int(backward)


def pack(host: torch.Tensor, sent_wall: float) -> torch.Tensor:
    """Header (send time) then the tensor's bytes, as one uint8 buffer."""
    payload = host.reshape(-1).view(torch.uint8)
    buf = torch.empty(HEADER_BYTES + payload.numel(), dtype=torch.uint8)
    buf[:HEADER_BYTES] = torch.tensor([sent_wall], dtype=torch.float64).view(torch.uint8)
    buf[HEADER_BYTES:] = payload
    return buf


def unpack(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
           ) -> tuple[torch.Tensor, float]:
    sent_wall = float(buf[:HEADER_BYTES].view(torch.float64)[0])
    return buf[HEADER_BYTES:].view(dtype).reshape(shape), sent_wall


class P2P:
    """`pacer` and `devices` (device id of each rank) hold receives over emulated links to the
    link's duration; without them receives return when the bytes are there. `routes`: peer
    rank -> (group, backend) where a transfer does not take the default group's host path
    (comm/bridge.py pair_groups): a device backend sends device tensors directly; a host
    backend stages them through pinned host memory, as the default path does."""

    def __init__(self, timeout_s: float, pacer: LinkPacer | None = None,
                 devices: list[str] | None = None, rank: int | None = None,
                 device: torch.device | None = None,
                 routes: dict[int, tuple[object | None, str]] | None = None):
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device or torch.device("cpu")
        self.stager = HostStager(self.device)
        self.routes = routes or {}
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.pacer = pacer
        self.devices = devices
        self.rank = dist.get_rank() if rank is None and pacer is not None else rank
        self.held_s = 0.0  # time receives were held past their real arrival
        # receives posted ahead: (src, tag) -> (work, buffer, posted at, payload bytes)
        self.posted: dict[tuple[int, int], tuple[dist.Work, torch.Tensor, float, int]] = {}

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        group, backend = self.routes.get(dst, (None, DEFAULT_BRIDGE))
        src = tensor.detach().contiguous()
        if on_device(backend):  # one kind, its own backend: device to device, no staging
            buf = src
        else:
            nbytes = src.numel() * src.element_size()
            buf = pinned_empty(HEADER_BYTES + nbytes, src.device)
            self.stager.to_host(src, out=buf[HEADER_BYTES:].view(src.dtype).view(src.shape))
            buf[:HEADER_BYTES] = torch.tensor([time.time()], dtype=torch.float64).view(
                torch.uint8)
        # Sends already received free their buffers now, not at the end of the step.
        self.pending = [(w, b) for w, b in self.pending if not w.is_completed()]
        self.pending.append((dist.isend(buf, dst, group=group, tag=tag), buf))

    def post(self, shape: tuple[int, ...], src: int, tag: int,
             dtype: torch.dtype = torch.float32) -> None:
        """Post a receive ahead of its action (plan.schedule.RECV_AHEAD), so the handshake
        and the bytes move while this rank computes."""
        if (src, tag) in self.posted:
            return
        group, backend = self.routes.get(src, (None, DEFAULT_BRIDGE))
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if on_device(backend):
            buf = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            buf = pinned_empty(HEADER_BYTES + nbytes, self.device)
        posted_wall = time.time()
        self.posted[(src, tag)] = (dist.irecv(buf, src, group=group, tag=tag), buf,
                                   posted_wall, nbytes)

    def recv(self, shape: tuple[int, ...], src: int, tag: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.post(shape, src, tag, dtype)
        work, buf, posted_wall, nbytes = self.posted.pop((src, tag))
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise RuntimeFailure(f"receive from rank {src} (tag {tag}) failed or timed out "
                                 f"after {self.timeout.total_seconds():.0f} s: {err}") from err
        if on_device(self.routes.get(src, (None, DEFAULT_BRIDGE))[1]):
            return buf  # real devices of one kind: nothing to pace, already on the device
        host, sent_wall = unpack(buf, shape, dtype)
        self._hold(src, nbytes, sent_wall, posted_wall)
        # A private tensor, not a view into the receive buffer with its header.
        return self.stager.to_device(host) if device == self.device else host.to(device,
                                                                                 copy=True)

    def _hold(self, src: int, nbytes: int, sent_wall: float, posted_wall: float) -> None:
        """Sleep until the emulated link would have delivered the bytes."""
        if self.pacer is None or self.devices is None or self.rank is None:
            return
        release = self.pacer.p2p_release_s(self.devices[src], self.devices[self.rank], nbytes,
                                           sent_wall, posted_wall)
        remaining = release - time.time()
        if remaining > 0:
            time.sleep(remaining)
            self.held_s += remaining

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait(self.timeout)
        self.pending.clear()

"""Point-to-point transfers between pipeline stages, explicit and staged through host memory.

batch_isend_irecv over gloo has hung under pipelining (PiPPy #1130, pytorch #132644), so
sends are plain isend of CPU tensors, receives wait with a timeout, and each message is
tagged by micro-batch and direction.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from hetrain.errors import RuntimeFailure


def tag_of(micro_batch: int, backward: bool) -> int:
    return 2 * micro_batch + int(backward)


class P2P:
    def __init__(self, timeout_s: float):
        self.timeout = timedelta(seconds=timeout_s)
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        host = tensor.detach().to("cpu").contiguous()
        self.pending.append((dist.isend(host, dst, tag=tag), host))

    def recv(self, shape: tuple[int, ...], src: int, tag: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        host = torch.empty(shape, dtype=dtype)
        work = dist.irecv(host, src, tag=tag)
        try:
            work.wait(self.timeout)
        except RuntimeError as err:
            raise RuntimeFailure(f"receive from rank {src} (tag {tag}) failed or timed out "
                                 f"after {self.timeout.total_seconds():.0f} s: {err}") from err
        return host.to(device)

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait(self.timeout)
        self.pending.clear()

"""The rendezvous store of a local run, hosted by the launcher on 127.0.0.1 only.

A `TCPStore` server listens on every interface whatever host name its clients use, and is
unauthenticated. The launcher binds the listening socket to the loopback address itself and
hands it to the store (`master_listen_fd`), so nothing off this host can reach it. Hosting it
in the launcher (not in worker 0) also lets the launcher read the workers' heartbeats.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

LOOPBACK = "127.0.0.1"


class LoopbackStore:
    """A TCPStore server on 127.0.0.1:`port` for `world` clients; close() when done."""

    def __init__(self, world: int, timeout_s: float):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((LOOPBACK, 0))
            listener.listen(max(128, 2 * world))
            self.port: int = listener.getsockname()[1]
            self.store = dist.TCPStore(LOOPBACK, self.port, world, is_master=True,
                                       timeout=timedelta(seconds=timeout_s),
                                       wait_for_workers=False,
                                       master_listen_fd=listener.fileno())
        except BaseException:
            listener.close()
            raise
        listener.detach()  # the store owns the socket now and closes it

    def counter(self, key: str) -> int:
        """A counter's value (0 when never added to); does not block."""
        return int(self.store.add(key, 0))

    def close(self) -> None:
        """Stop listening (the store closes its socket when released)."""
        self.store = None


def gloo_on_loopback() -> None:
    """Gloo listens on the address its host name resolves to, which on some hosts is an
    interface the other local workers cannot reach (they wait for each other until the op
    timeout). A local run keeps gloo on the loopback interface, unless the user chose one."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return
    if "lo" in names:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"

"""Emulated links: when a transfer may complete, by the cost model's link model, so that an
emulated run's transfers last what the simulator gives them (as the Pacer does for compute).

The rule is the simulator's (sim/engine.py): the bytes move from max(sent, receive posted +
handshake) for p2p_s seconds; every duration is stretched by the run's time scale. Times are
wall-clock seconds (time.time()), comparable between the processes of one machine, which is
where emulated kinds run.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from hetrain.cluster.topology import Cluster


class LinkCosts(Protocol):
    """The link figures of cost.CostModel the pacer reads (comm does not import cost)."""

    def p2p_s(self, src_device: str, dst_device: str, nbytes: float) -> float: ...

    def p2p_handshake_s(self, src_device: str, dst_device: str) -> float: ...

    def sync_s(self, devices: list[str], nbytes: float) -> float: ...


class LinkPacer:
    """Release times of emulated transfers. A link is emulated when either end's kind is:
    between two real devices the real link already takes its own time."""

    def __init__(self, cluster: Cluster, cost: LinkCosts, time_scale: float,
                 emulated_kinds: Collection[str]):
        self.cluster = cluster
        self.cost = cost
        self.time_scale = time_scale
        self.emulated_kinds = set(emulated_kinds)

    def paces(self, src_dev: str, dst_dev: str) -> bool:
        kind = self.cluster.device_by_id
        return src_dev != dst_dev and (kind[src_dev].kind in self.emulated_kinds
                                       or kind[dst_dev].kind in self.emulated_kinds)

    def p2p_release_s(self, src_dev: str, dst_dev: str, nbytes: float, sent_wall: float,
                      posted_wall: float) -> float:
        """Wall-clock time before which a receive of `nbytes` from `src_dev` must not return:
        its bytes start once both the send is made and the receiver's ready notice
        (handshake) has reached the sender, then take the link's transfer time. Where the
        link is not emulated, the real receive's end is the release (returns 0)."""
        if not self.paces(src_dev, dst_dev):
            return 0.0
        handshake_s = self.cost.p2p_handshake_s(src_dev, dst_dev) * self.time_scale
        start = max(sent_wall, posted_wall + handshake_s)
        return start + self.cost.p2p_s(src_dev, dst_dev, nbytes) * self.time_scale

    def collective_s(self, devices: list[str], nbytes: float) -> float:
        """Emulated duration of an all-reduce of `nbytes` over `devices` (0 when none of
        their kinds is emulated)."""
        kinds = {self.cluster.device_by_id[d].kind for d in devices}
        if not kinds & self.emulated_kinds:
            return 0.0
        return self.cost.sync_s(list(devices), nbytes) * self.time_scale

"""The planner's view of the links, from counts per kind rather than device ids.

Two stages of one kind in one pipeline copy talk inside a node when the copy's devices of that
kind fit in the kind's largest node; replicas of a stage do when all copies' devices of that
kind fit there. Otherwise they go between nodes (the slowest NIC of the kind's nodes bounds
them), and stages of different kinds always do, through the host bridge. Where every kind
sits in one node, or one device per node, this is exactly what the placed plan gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel


@dataclass(frozen=True)
class Link:
    gbps: float
    latency_s: float

    def transfer_s(self, nbytes: float) -> float:
        """As CostModel.p2p_s: latency plus bytes over bandwidth."""
        return self.latency_s + nbytes / (self.gbps * 1e9)


class LinkModel:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        links = cluster.links
        self._largest: dict[str, int] = {}
        self._intra: dict[str, float] = {}
        self._nic: dict[str, float] = {}
        for node in cluster.node_by_name.values():
            kind = cluster.kinds[node.kind]
            if node.count > self._largest.get(node.kind, 0):
                self._largest[node.kind] = node.count
                self._intra[node.kind] = node.intra_node_gbps or kind.intra_node_gbps
            nic = node.nic_gbps if node.nic_gbps is not None else float("inf")
            self._nic[node.kind] = min(self._nic.get(node.kind, float("inf")), nic)
        self._intra_latency_s = links.intra_node_latency_us * 1e-6
        self._inter_latency_s = links.inter_node_latency_us * 1e-6

    def largest_node(self, kind: str) -> int:
        return self._largest.get(kind, 0)

    def fits_node(self, kind: str, devices: int) -> bool:
        """Whether `devices` of `kind` placed together share one node."""
        return devices <= self._largest[kind]

    def same_kind(self, kind: str, local: bool) -> Link:
        """The link between two devices of `kind`: inside a node when `local`."""
        if local:
            return Link(self._intra[kind], self._intra_latency_s)
        return Link(min(self.cluster.links.inter_node_gbps, self._nic[kind]),
                    self._inter_latency_s)

    def between_kinds(self, a: str, b: str) -> Link:
        links = self.cluster.links
        return Link(min(links.inter_node_gbps, self._nic[a], self._nic[b], links.bridge_gbps),
                    self._inter_latency_s)


class BoundaryComm:
    """What a stage waits for its inputs, per micro-batch, as the runtime moves them: the
    receiver posts its receive when it gets to the action, then the handshake and the
    transfer pass (CostModel.p2p_handshake_s + p2p_s). Stages are given as (kind, whether the
    pipeline copy's devices of that kind share a node); the vectors are indexed by the stage's
    first layer (the activation coming in) and by its end (the gradient coming back)."""

    def __init__(self, cost: CostModel, links: LinkModel, dtypes: dict[str, str],
                 micro_batch_size: int):
        self.cost = cost
        self.links = links
        self.dtypes = dtypes
        self.micro_batch_size = micro_batch_size
        self.n_layers = cost.spec.n_layers
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def link(self, a: tuple[str, bool], b: tuple[str, bool]) -> Link:
        if a[0] == b[0]:
            return self.links.same_kind(a[0], a[1])
        return self.links.between_kinds(a[0], b[0])

    def wait_s(self, link: Link, boundary: int, sender_kind: str) -> float:
        nbytes = self.cost.activation_bytes(boundary, self.micro_batch_size,
                                            self.dtypes[sender_kind])
        return link.latency_s + link.transfer_s(nbytes)

    def handshake_s(self, prev: tuple[str, bool] | None, cur: tuple[str, bool],
                    nxt: tuple[str, bool] | None) -> tuple[float, float]:
        """The part of recv_s's waits (activation in, gradient back) before the bytes move:
        the receiver's ready notice crossing the link."""
        return (0.0 if prev is None else self.link(prev, cur).latency_s,
                0.0 if nxt is None else self.link(cur, nxt).latency_s)

    def recv_s(self, prev: tuple[str, bool] | None, cur: tuple[str, bool],
               nxt: tuple[str, bool] | None) -> tuple[np.ndarray, np.ndarray]:
        key = (prev, cur, nxt)
        if key not in self._cache:
            fwd = np.zeros(self.n_layers + 1)
            bwd = np.zeros(self.n_layers + 1)
            if prev is not None:
                link = self.link(prev, cur)
                fwd[1:] = [self.wait_s(link, a, prev[0]) for a in range(1, self.n_layers + 1)]
            if nxt is not None:
                link = self.link(cur, nxt)
                bwd[1:-1] = [self.wait_s(link, b, nxt[0]) for b in range(1, self.n_layers)]
            self._cache[key] = (fwd, bwd)
        return self._cache[key]

"""Cluster: nodes of devices of known kinds, and the links between them."""

from __future__ import annotations

from collections import Counter
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hetrain.cluster.kinds import DeviceKind

# Devices one cluster file may hold: every device is an object in memory and the planner
# looks at each, so a typo like `count: 1000000000` is refused here, before anything is
# allocated. 65,536 devices load and plan in seconds.
MAX_DEVICES = 65_536


class Device(BaseModel):
    """One accelerator: `id` is "<node>:<local index>", unique in the cluster."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str
    node: str
    local_index: int


class Node(BaseModel):
    """A host with `count` devices of one kind; `replicas` stamps out identical nodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: str = Field(min_length=1)
    count: int = Field(default=1, gt=0)
    replicas: int = Field(default=1, gt=0)
    intra_node_gbps: float | None = Field(default=None, gt=0)
    nic_gbps: float | None = Field(default=None, gt=0, description="GB/s out of the node")


class Links(BaseModel):
    """Bandwidths (GB/s) and latencies (us) the cost model uses for traffic between devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inter_node_gbps: float = Field(default=25.0, gt=0)
    inter_node_latency_us: float = Field(default=10.0, ge=0)
    intra_node_latency_us: float = Field(default=5.0, ge=0)
    bridge_gbps: float = Field(
        default=20.0, gt=0, description="host-memory bridge between kinds (device->host->device)"
    )


class Cluster(BaseModel):
    """Devices by kind and where they sit. Planning works on counts per kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "cluster"
    kinds: dict[str, DeviceKind]
    nodes: list[Node] = Field(min_length=1)
    links: Links = Links()
    bridge_backend: str = Field(
        default="gloo", min_length=1, description="torch.distributed backend of the host "
        "bridge between kinds; any backend registered in the process (comm/bridge.py)")
    bridge_plugin: str | None = Field(
        default=None, description="module to import first: the plugin that registers "
        "bridge_backend (None: built into torch)")

    @model_validator(mode="after")
    def _check(self) -> Cluster:
        total = sum(node.count * node.replicas for node in self.nodes)
        if total > MAX_DEVICES:
            raise ValueError(f"nodes: {total:,} devices in all (count x replicas), more than "
                             f"the limit of {MAX_DEVICES:,}; check count and replicas")
        names: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.kind not in self.kinds:
                raise ValueError(f"nodes[{i}].kind: unknown kind {node.kind!r}")
            for name in self._node_names(node):
                if name in names:
                    raise ValueError(f"nodes[{i}].name: node {name!r} appears twice")
                names.add(name)
        return self

    @staticmethod
    def _node_names(node: Node) -> list[str]:
        if node.replicas == 1:
            return [node.name]
        return [f"{node.name}-{r}" for r in range(node.replicas)]

    @cached_property
    def devices(self) -> list[Device]:
        out = []
        for node in self.nodes:
            for node_name in self._node_names(node):
                for i in range(node.count):
                    out.append(Device(id=f"{node_name}:{i}", kind=node.kind, node=node_name,
                                      local_index=i))
        return out

    @cached_property
    def device_by_id(self) -> dict[str, Device]:
        return {d.id: d for d in self.devices}

    @cached_property
    def node_by_name(self) -> dict[str, Node]:
        return {name: node for node in self.nodes for name in self._node_names(node)}

    def kind_counts(self) -> dict[str, int]:
        """Devices per kind, in order of first appearance."""
        return dict(Counter(d.kind for d in self.devices))

    def kind_of(self, device_id: str) -> DeviceKind:
        return self.kinds[self.device_by_id[device_id].kind]

    def devices_of(self, kind: str) -> list[Device]:
        return [d for d in self.devices if d.kind == kind]

    def devices_per_node(self, kind: str) -> int:
        """The largest count of `kind` in one node: the bound on a tensor-parallel group."""
        return max((n.count for n in self.nodes if n.kind == kind), default=0)

    def link_gbps(self, a: str, b: str) -> float:
        """Bandwidth between devices a and b (GB/s)."""
        da, db = self.device_by_id[a], self.device_by_id[b]
        if da.node == db.node:
            node = self.node_by_name[da.node]
            return node.intra_node_gbps or self.kinds[node.kind].intra_node_gbps
        bw = self.links.inter_node_gbps
        for d in (da, db):
            nic = self.node_by_name[d.node].nic_gbps
            if nic is not None:
                bw = min(bw, nic)
        if da.kind != db.kind:
            bw = min(bw, self.links.bridge_gbps)
        return bw

    def link_latency_s(self, a: str, b: str) -> float:
        same_node = self.device_by_id[a].node == self.device_by_id[b].node
        us = self.links.intra_node_latency_us if same_node else self.links.inter_node_latency_us
        return us * 1e-6

    def without(self, device_ids: set[str]) -> Cluster:
        """The cluster less some devices (for re-planning after a failure)."""
        nodes: list[Node] = []
        for node in self.nodes:
            for node_name in self._node_names(node):
                alive = sum(f"{node_name}:{i}" not in device_ids for i in range(node.count))
                if alive:
                    nodes.append(node.model_copy(update={"name": node_name, "count": alive,
                                                         "replicas": 1}))
        # Validate anew rather than model_copy: the copy would carry the cached device list.
        return Cluster.model_validate({**self.model_dump(),
                                       "nodes": [n.model_dump() for n in nodes]})

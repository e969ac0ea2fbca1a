"""Gradient all-reduce across kinds: the native backend inside a kind, a gloo bridge over host
memory between kinds, on flat buckets of gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hetrain.comm.groups import BRIDGE_BACKEND, GroupCache

BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class HierarchicalAllReduce:
    """Sum over `ranks` (each rank has a kind): reduce to a leader per kind, all-reduce among
    leaders over the bridge, broadcast inside each kind. One kind: one native all-reduce."""

    ranks: tuple[int, ...]
    kind_of: dict[int, str]
    backend_of: dict[str, str]  # kind -> torch backend for its intra-kind group

    def build(self, cache: GroupCache) -> None:
        """Create the groups; call on EVERY rank, in the same order, member or not."""
        by_kind: dict[str, list[int]] = {}
        for r in self.ranks:
            by_kind.setdefault(self.kind_of[r], []).append(r)
        self.by_kind = by_kind
        self.kind_groups = {k: cache.get(rs, self.backend_of[k]) for k, rs in by_kind.items()}
        self.leaders = [rs[0] for rs in by_kind.values()]
        self.bridge = cache.get(self.leaders, BRIDGE_BACKEND) if len(by_kind) > 1 else None

    def __call__(self, tensor: torch.Tensor) -> None:
        rank = dist.get_rank()
        kind = self.kind_of[rank]
        members = self.by_kind[kind]
        group = self.kind_groups[kind]
        if len(self.by_kind) == 1:
            if group is not None:
                dist.all_reduce(tensor, group=group)
            return
        leader = members[0]
        if group is not None:
            dist.reduce(tensor, dst=leader, group=group)
        if rank == leader:
            # The bridge owns the copy to host memory: NCCL/RCCL tensors are not gloo tensors.
            host = tensor if tensor.device.type == "cpu" else tensor.cpu()
            dist.all_reduce(host, group=self.bridge)
            if host is not tensor:
                tensor.copy_(host)
        if group is not None:
            dist.broadcast(tensor, src=leader, group=group)


def bucketed(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES
             ) -> list[list[torch.Tensor]]:
    """Consecutive tensors grouped into buckets of at most `bucket_bytes` (one if larger)."""
    buckets: list[list[torch.Tensor]] = []
    size = bucket_bytes
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if size + nbytes > bucket_bytes or not buckets:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


def all_reduce_tensors(tensors: Sequence[torch.Tensor], reduce: HierarchicalAllReduce,
                       bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum each tensor in place over the reducer's ranks, a flat bucket at a time."""
    for bucket in bucketed(tensors, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        reduce(flat)
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            t.copy_(synced)

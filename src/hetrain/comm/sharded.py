"""Sharded sum of a flat buffer over ranks of several kinds: reduce-scatter inside each kind
(native backend), each shard summed with its peers of the other kinds over the host bridge
(gloo), all-gather inside each kind. With ZeRO-1 the cross-kind step scatters each segment
to one owner per element and the all-gather carries updated parameters instead of gradients.

Layout of the flat buffer of `numel` elements (every member builds the same one):
- each kind splits the buffer among its members (`kind shards`, uneven by weight);
- the union of all kinds' shard boundaries cuts it into segments; a segment has one owner
  per kind (the member whose kind shard holds it), and its cross-kind sum runs among them;
- ZeRO-1: a segment is split again among its owners in proportion to their kinds' total
  weights, so a member owns weight / (all members' weight) of the buffer.

gloo has no uneven all-gather: it is run on pieces padded to the largest (bytes of the
padding are the only extra). gloo's reduce-scatter is an all-reduce per rank (or missing
before torch 2.8): on gloo groups a reduce-scatter is one all-reduce of the buffer, keeping
the shard, which moves about twice the bytes of a ring reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetrain.comm.bridge import on_device
from hetrain.comm.groups import BRIDGE_BACKEND, GroupCache

Split = Callable[[list[float], int], list[tuple[int, int]]]  # weights, numel -> bounds


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    owners: tuple[int, ...]  # one rank per kind, in kind order
    pieces: tuple[tuple[int, int], ...]  # ZeRO-1: owners[i] steps pieces[i]


@dataclass
class FlatLayout:
    kinds: list[str]
    members: dict[str, list[int]]  # kind -> ranks, in the collective's order
    kind_shards: dict[int, tuple[int, int]]  # rank -> its kind shard
    segments: list[Segment]
    numel: int

    @classmethod
    def build(cls, ranks: tuple[int, ...], kind_of: dict[int, str], weight_of: dict[int, float],
              numel: int, split: Split) -> FlatLayout:
        members: dict[str, list[int]] = {}
        for r in ranks:
            members.setdefault(kind_of[r], []).append(r)
        kinds = list(members)
        shards: dict[int, tuple[int, int]] = {}
        for rs in members.values():
            shards.update(zip(rs, split([weight_of[r] for r in rs], numel), strict=True))
        cuts = sorted({0, numel} | {b for s in shards.values() for b in s})
        kind_weight = [sum(weight_of[r] for r in members[k]) for k in kinds]
        segments = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            if a == b:
                continue
            owners = tuple(next(r for r in members[k] if shards[r][0] <= a < shards[r][1])
                           for k in kinds)
            pieces = tuple((a + s, a + e) for s, e in split(kind_weight, b - a))
            segments.append(Segment(a, b, owners, pieces))
        return cls(kinds, members, shards, segments, numel)

    def zero_pieces(self, rank: int) -> list[tuple[int, int]]:
        """The elements `rank` steps under ZeRO-1 (non-empty ranges, in order)."""
        mine = [seg.pieces[seg.owners.index(rank)] for seg in self.segments
                if rank in seg.owners]
        return [(a, b) for a, b in mine if a < b]


class ShardedSum:
    """One collective over `ranks`. `build` on EVERY rank in one order; call the rest on
    members only."""

    def __init__(self, layout: FlatLayout, backend_of: dict[str, str],
                 bridge: str = BRIDGE_BACKEND):
        self.layout = layout
        self.backend_of = backend_of
        self.bridge_backend = bridge

    def build(self, cache: GroupCache) -> None:
        lay = self.layout
        self.kind_group = {k: cache.get(rs, self.backend_of[k]) for k, rs in lay.members.items()}
        self.bridge = {seg.owners: cache.get(seg.owners, self.bridge_backend)
                       for seg in lay.segments if len(seg.owners) > 1}

    # --- phases --------------------------------------------------------------------------
    def reduce_scatter(self, flat: torch.Tensor) -> bool:
        """flat[my kind shard] becomes the sum over my kind's members; True when all of
        `flat` did (an all-reduce, or a kind of one member)."""
        rank = dist.get_rank()
        kind = self._kind(rank)
        group = self.kind_group[kind]
        if group is None:
            return True
        mine = flat[slice(*self.layout.kind_shards[rank])]
        if dist.get_backend(group) == "gloo":
            # gloo's reduce_scatter is one all-reduce per rank (torch >= 2.8) or missing:
            # one all-reduce of the buffer moves as many bytes, in fewer messages.
            dist.all_reduce(flat, group=group)
            return True
        chunks = [flat[slice(*self.layout.kind_shards[r])] for r in self._by_group_rank(kind)]
        out = torch.empty_like(mine)
        dist.reduce_scatter(out, [c.contiguous() for c in chunks], group=group)
        mine.copy_(out)
        return False

    def cross_kind(self, flat: torch.Tensor) -> None:
        """Each segment of my kind shard summed with its owners of the other kinds over the
        bridge. (ZeRO-1 needs only each owner's piece: gloo's reduce-scatter would be one
        all-reduce per owner, so one all-reduce of the segment it is.)"""
        for seg in self._my_segments(dist.get_rank()):
            part = flat[seg.start:seg.end]
            # The bridge owns the copy to host memory: NCCL/RCCL tensors are not gloo tensors.
            host = part if part.device.type == "cpu" or on_device(self.bridge_backend) \
                else part.cpu()
            dist.all_reduce(host, group=self.bridge[seg.owners])
            if host is not part:
                part.copy_(host)

    def gather_pieces(self, flat: torch.Tensor) -> None:
        """ZeRO-1: each owner's piece of each segment of my kind shard to the other owners."""
        rank = dist.get_rank()
        for seg in self._my_segments(rank):
            group = self.bridge[seg.owners]
            ordered = self._pieces_by_group_rank(seg, group)
            mine = seg.pieces[seg.owners.index(rank)]
            for (a, b), got in zip(ordered, _padded_all_gather(flat[mine[0]:mine[1]], [
                    b - a for a, b in ordered], group), strict=True):
                flat[a:b].copy_(got)

    def all_gather(self, flat: torch.Tensor) -> None:
        """Every member of my kind gets every kind shard."""
        rank = dist.get_rank()
        kind = self._kind(rank)
        group = self.kind_group[kind]
        if group is None:
            return
        order = self._by_group_rank(kind)
        bounds = [self.layout.kind_shards[r] for r in order]
        mine = self.layout.kind_shards[rank]
        for (a, b), got in zip(bounds, _padded_all_gather(flat[mine[0]:mine[1]],
                                                          [b - a for a, b in bounds], group),
                               strict=True):
            flat[a:b].copy_(got)

    def sum(self, flat: torch.Tensor) -> None:
        """The whole sum in place: every member ends with the total of every element."""
        whole = self.reduce_scatter(flat)
        if whole and len(self.layout.kinds) == 1:
            return  # one kind, summed whole: no shard to spread (nor its buffers to hold)
        self.cross_kind(flat)
        self.all_gather(flat)

    # --- helpers -------------------------------------------------------------------------
    def _kind(self, rank: int) -> str:
        return next(k for k, rs in self.layout.members.items() if rank in rs)

    def _by_group_rank(self, kind: str) -> list[int]:
        group = self.kind_group[kind]
        return sorted(self.layout.members[kind], key=lambda r: dist.get_group_rank(group, r))

    def _my_segments(self, rank: int) -> list[Segment]:
        return [s for s in self.layout.segments if len(s.owners) > 1 and rank in s.owners]

    @staticmethod
    def _pieces_by_group_rank(seg: Segment, group) -> list[tuple[int, int]]:
        order = sorted(range(len(seg.owners)),
                       key=lambda i: dist.get_group_rank(group, seg.owners[i]))
        return [seg.pieces[i] for i in order]


def _padded_all_gather(mine: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """All-gather of uneven 1-D pieces (sizes in group-rank order), padded to the largest."""
    width = max(sizes)
    device = mine.device if on_device(dist.get_backend(group)) else torch.device("cpu")
    padded = torch.zeros(width, dtype=mine.dtype, device=device)
    padded[:mine.numel()] = mine
    outs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(outs, padded, group=group)
    return [o[:n].to(mine.device) for o, n in zip(outs, sizes, strict=True)]

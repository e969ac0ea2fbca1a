"""Uneven layer partitions: the split of a pipeline's layers that minimises its slowest stage.

A stage's time per micro-batch is its forward and backward plus the waits for its inputs
(links.BoundaryComm). Dynamic programming over suffixes: under 1F1B the stage d places from
the end holds d micro-batches in flight, so a suffix's best split depends only on the stage
before it (whose kind sets the link its activations come over), and pipelines that end alike
share work. A pipeline is given as blocks (kind, tp, stages, whether the copy's devices of
that kind share a node), so a suffix is the same blocks with fewer stages in the first. A
stage runs without recomputation when that fits in memory, else with it, else the range is
infeasible for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrain.cost.tables import StageTables, TableCache
from hetrain.planner.links import BoundaryComm

# Memory checks keep this slack so that float rounding never turns a fit into an overflow.
MEMORY_SLACK = 1e-9

BlockKey = tuple[str, int, int, bool]  # (kind, tp, stages, the copy's devices of it share a node)
Blocks = tuple[BlockKey, ...]
Peer = tuple[str, bool] | None  # (kind, in one node) of a neighbour stage


@dataclass(frozen=True)
class Partition:
    """Per stage: layer range, recomputation, forward+backward seconds of one micro-batch,
    and seconds waiting for its inputs."""

    layers: tuple[tuple[int, int], ...]
    recompute: tuple[bool, ...]
    stage_s: tuple[float, ...]
    wait_s: tuple[float, ...]

    @property
    def slot_s(self) -> float:
        return max(t + w for t, w in zip(self.stage_s, self.wait_s, strict=True))


def drop_first_stage(blocks: Blocks) -> Blocks:
    kind, tp, count, local = blocks[0]
    return ((kind, tp, count - 1, local), *blocks[1:]) if count > 1 else blocks[1:]


def n_stages(blocks: Blocks) -> int:
    return sum(b[2] for b in blocks)


def peer(blocks: Blocks) -> Peer:
    return (blocks[0][0], blocks[0][3]) if blocks else None


class Partitioner:
    """Best partitions of one micro-batch size's pipelines, memoised by suffix."""

    def __init__(self, tables: TableCache, dtypes: dict[str, str], micro_batch_size: int,
                 comm: BoundaryComm, allow_recompute: bool = True, optimizer_shards: int = 1):
        self.tables = tables
        self.optimizer_shards = optimizer_shards  # memory: ZeRO-1 over at least this many
        self.comm = comm
        self.dtypes = dtypes
        self.micro_batch_size = micro_batch_size
        self.allow_recompute = allow_recompute
        self.n_layers = tables.n_layers
        end = np.full(self.n_layers + 1, np.inf)
        end[-1] = 0.0
        self._end = end
        self._best: dict[tuple[Peer, Blocks], np.ndarray] = {}
        self._choice: dict[tuple[Peer, Blocks], np.ndarray] = {}
        self._costs: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def stage_tables(self, kind: str, tp: int) -> StageTables:
        return self.tables.get(kind, tp, self.dtypes[kind], self.micro_batch_size,
                               self.optimizer_shards)

    def stage_costs(self, kind: str, tp: int, in_flight: int) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per range for this stage (inf where it does not fit) and where it recomputes."""
        key = (kind, tp, in_flight)
        if key not in self._costs:
            t = self.stage_tables(kind, tp)
            cap = t.capacity_bytes * (1 - MEMORY_SLACK)
            floor_fits = t.floor_bytes <= cap  # states and gradient-sync buffers
            fits = (t.fixed_bytes[0] + in_flight * t.per_in_flight_bytes[0] <= cap) & floor_fits
            if self.allow_recompute:
                fits_rc = (t.fixed_bytes[1] + in_flight * t.per_in_flight_bytes[1] <= cap) \
                    & floor_fits
            else:
                fits_rc = np.zeros_like(fits)
            cost = np.where(fits, t.time_s[0], np.where(fits_rc, t.time_s[1], np.inf))
            self._costs[key] = (cost, ~fits & fits_rc)
        return self._costs[key]

    def stage_matrix(self, before: Peer, blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per range of the first stage of `blocks` (compute + waits), and where it
        recomputes."""
        kind, tp, _, local = blocks[0]
        cost, rc = self.stage_costs(kind, tp, n_stages(blocks))
        fwd, bwd = self.comm.recv_s(before, (kind, local), peer(drop_first_stage(blocks)))
        return cost + fwd[:, None] + bwd[None, :], rc

    def _after(self, before: Peer, blocks: Blocks) -> np.ndarray:
        return self._end if not blocks else self._best[(before, blocks)]

    def _solve(self, blocks: Blocks, before: Peer = None) -> np.ndarray:
        """best[a]: the least slowest-stage time covering layers [a, end) with `blocks`, the
        stage before them being `before`."""
        pending = []
        key = (before, blocks)
        while key[1] and key not in self._best:
            pending.append(key)
            key = (peer(key[1]), drop_first_stage(key[1]))
        for prev, rest in reversed(pending):
            after = self._after(peer(rest), drop_first_stage(rest))
            cost, _ = self.stage_matrix(prev, rest)
            both = np.maximum(cost, after[None, :])
            choice = both.argmin(axis=1)
            self._best[(prev, rest)] = both[np.arange(len(after)), choice]
            self._choice[(prev, rest)] = choice
        return self._after(before, blocks)

    def slot_s(self, blocks: Blocks) -> float:
        """The slowest stage of the best partition; inf when nothing fits."""
        return float(self._solve(blocks)[0])

    def best(self, blocks: Blocks) -> Partition | None:
        if not np.isfinite(self.slot_s(blocks)):
            return None
        layers, recompute, times, waits = [], [], [], []
        a, before, key = 0, None, blocks
        while key:
            b = int(self._choice[(before, key)][a])
            kind, tp, _, _ = key[0]
            cost, rc = self.stage_costs(kind, tp, n_stages(key))
            fwd, bwd = self.comm.recv_s(before, peer(key), peer(drop_first_stage(key)))
            layers.append((a, b))
            recompute.append(bool(rc[a, b]))
            times.append(float(cost[a, b]))
            waits.append(float(fwd[a] + bwd[b]))
            a, before, key = b, peer(key), drop_first_stage(key)
        return Partition(layers=tuple(layers), recompute=tuple(recompute), stage_s=tuple(times),
                         wait_s=tuple(waits))

"""Uneven layer partitions: the split of a pipeline's layers that minimises its slowest stage.

A stage's time per micro-batch is its forward and backward plus the waits for its inputs
(links.BoundaryComm). Dynamic programming over suffixes: under 1F1B the stage d places from
the end holds d micro-batches in flight, so a suffix's best split depends only on the stage
before it (whose kind sets the link its activations come over), and pipelines that end alike
share work. A pipeline is given as blocks (kind, tp, stages, whether the copy's devices of
that kind share a node), so a suffix is the same blocks with fewer stages in the first. A
stage runs without recomputation when that fits in memory, else with it, else the range is
infeasible for it.

A large cluster's search partitions some 20,000 outlines, so each DP step is kept small: a
stage's costs depend only on (stage before, its kind, tp, node, in-flight, stage after), so
they are built once per such signature, as a band of the ranges that fit in memory (a range
[a, b) fits up to some end b, and a big model's stage holds few layers); a whole pipeline
(no stage before) needs only its best from layer 0; and the steps of many pipelines run
level by level as array operations (solve_many).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from hetrain.cost.model import PLAIN, RECOMPUTE, REGATHER
from hetrain.cost.tables import StageTables, TableCache
from hetrain.planner.links import BoundaryComm

# Memory checks keep this slack so that float rounding never turns a fit into an overflow.
MEMORY_SLACK = 1e-9
NO_LIMIT = 1 << 20  # in-flight micro-batches: more than any pipeline holds

BlockKey = tuple[str, int, int, bool]  # (kind, tp, stages, the copy's devices of it share a node)
Blocks = tuple[BlockKey, ...]
Peer = tuple[str, bool] | None  # (kind, in one node) of a neighbour stage


@dataclass(frozen=True)
class Partition:
    """Per stage: layer range, memory mode (cost.model PLAIN, RECOMPUTE, REGATHER),
    forward+backward seconds of one micro-batch, and seconds waiting for its inputs."""

    layers: tuple[tuple[int, int], ...]
    modes: tuple[int, ...]
    stage_s: tuple[float, ...]
    wait_s: tuple[float, ...]
    # wait_s's two waits, the activation coming in and the gradient coming back, each as
    # (handshake, transfer) as the shared schedule times them
    forward_wait_s: tuple[tuple[float, float], ...] = ()
    backward_wait_s: tuple[tuple[float, float], ...] = ()

    @property
    def slot_s(self) -> float:
        return max(t + w for t, w in zip(self.stage_s, self.wait_s, strict=True))


@dataclass(frozen=True)
class _Band:
    """A stage's seconds per range [a, b) kept only where some start's ranges are finite:
    cost[a, j] is range [a, first[a] + j), inf past the row's last finite range."""

    first: np.ndarray  # (starts,) the least end b with a finite cost, per start
    cost: np.ndarray  # (starts, width) seconds

    @staticmethod
    def of(matrix: np.ndarray) -> _Band:
        """The band of a (starts, ends) matrix: per row from its first finite entry to its
        last, as wide as the widest row (the same values, so argmin picks the same end)."""
        n = matrix.shape[1]
        finite = np.isfinite(matrix)
        any_finite = finite.any(axis=1)
        first = np.where(any_finite, finite.argmax(axis=1), n - 1)
        last = np.where(any_finite, n - 1 - finite[:, ::-1].argmax(axis=1), n - 1)
        width = int((last - first).max()) + 1
        cols = first[:, None] + np.arange(width)[None, :]
        inside = cols <= last[:, None]
        rows = np.arange(len(matrix))[:, None]
        return _Band(first=first, cost=np.where(inside, matrix[rows, np.minimum(cols, n - 1)],
                                                np.inf))


def most_in_flight(t: StageTables, mode: int, cap: float) -> np.ndarray:
    """Per range, the most micro-batches in flight with which it fits in `cap` bytes under
    the memory mode: fixed + in_flight * per_in_flight <= cap and the floor (states,
    gradient-sync buffers) <= cap; -1 where none fits, a large count where activations cost
    nothing."""
    fixed, per = t.fixed_bytes[mode], t.per_in_flight_bytes[mode]
    room = cap - fixed
    with np.errstate(divide="ignore", invalid="ignore"):
        most = np.where(per > 0, np.floor(room / np.where(per > 0, per, 1.0)),
                        np.where(room >= 0, NO_LIMIT, -1))
    # floor division can land one off the exact test: settle the boundary with it
    most = np.where(fixed + (most + 1) * per <= cap, most + 1, most)
    most = np.where((most >= 0) & (fixed + most * per > cap), most - 1, most)
    return np.where(t.floor_bytes <= cap, np.clip(most, -1, NO_LIMIT), -1)


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
        self._costs: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._limits: dict[tuple[str, int], list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self._bands: dict[tuple, _Band] = {}
        self._compute_bands: dict[tuple[str, int, int], tuple[_Band, np.ndarray]] = {}
        self._lo: dict[tuple[Peer, Blocks], int] = {}  # least start computed, per suffix

    def stage_tables(self, kind: str, tp: int) -> StageTables:
        return self.tables.get(kind, tp, self.dtypes[kind], self.micro_batch_size,
                               self.optimizer_shards)

    def stage_costs(self, kind: str, tp: int, in_flight: int) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per range for this stage (inf where it does not fit) and its memory mode:
        the fastest that fits (plain, then regathering, then recomputation). Kept for the
        stages of the pipelines completed; the DP keeps bands only (_compute_band)."""
        key = (kind, tp, in_flight)
        if key not in self._costs:
            self._costs[key] = self._stage_costs(kind, tp, in_flight, True)
        return self._costs[key]

    def _stage_costs(self, kind: str, tp: int, in_flight: int,
                     modes: bool) -> tuple[np.ndarray, np.ndarray | None]:
        # the first mode that fits, from the least preferred up
        cost = np.full((self.n_layers + 1, self.n_layers + 1), np.inf)
        mode = np.zeros(cost.shape, dtype=np.int8) if modes else None
        for m, time_s, most in reversed(self._mode_limits(kind, tp)):
            fits = most >= in_flight
            cost = np.where(fits, time_s, cost)
            if mode is not None:
                mode = np.where(fits, np.int8(m), mode)
        return cost, mode

    def _mode_limits(self, kind: str, tp: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per memory mode allowed, in order of preference: its seconds per range and the most
        micro-batches a range may hold in flight and fit (-1: not even its states)."""
        key = (kind, tp)
        if key not in self._limits:
            t = self.stage_tables(kind, tp)
            cap = t.capacity_bytes * (1 - MEMORY_SLACK)
            modes = (PLAIN, REGATHER, RECOMPUTE) if self.allow_recompute else (PLAIN, REGATHER)
            out = []
            for m in modes:
                if m == REGATHER and not t.sequence_parallel:
                    continue  # nothing to regather
                out.append((m, t.time_s[m], most_in_flight(t, m, cap)))
            self._limits[key] = out
        return self._limits[key]

    def most_held(self, kind: str, tp: int, mode: int, a: int, b: int) -> int:
        """The most micro-batches in flight with which range [a, b) fits in memory under
        the mode (-1: not even its states)."""
        return next(int(most[a, b]) for m, _, most in self._mode_limits(kind, tp) if m == mode)

    def stage_matrix(self, before: Peer, blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per range of the first stage of `blocks` (compute + waits), and its memory
        mode."""
        kind, tp, _, local = blocks[0]
        cost, rc = self.stage_costs(kind, tp, n_stages(blocks))
        fwd, bwd = self.comm.recv_s(before, (kind, local), peer(drop_first_stage(blocks)))
        return cost + fwd[:, None] + bwd[None, :], rc

    def stage_band(self, before: Peer, blocks: Blocks, depth: int | None = None) -> _Band:
        """stage_matrix as a band of the ranges each start can take, memoised by signature
        (`depth`: the stages of `blocks`, when the caller knows them). The band's limits
        are where the stage fits in memory (waits are finite): one per (kind, tp, in-flight)."""
        rest = drop_first_stage(blocks)
        kind, tp, _, local = blocks[0]
        depth = depth or n_stages(blocks)
        key = (before, kind, tp, local, depth, peer(rest))
        band = self._bands.get(key)
        if band is None:
            compute, ends = self._compute_band(kind, tp, depth)
            fwd, bwd = self.comm.recv_s(before, (kind, local), peer(rest))
            # as stage_matrix, in the same order of sums
            band = self._bands[key] = _Band(compute.first,
                                            compute.cost + fwd[:, None] + bwd[ends])
        return band

    def _compute_band(self, kind: str, tp: int, in_flight: int) -> tuple[_Band, np.ndarray]:
        """The band of stage_costs, and its ends b per (start, column)."""
        key = (kind, tp, in_flight)
        if key not in self._compute_bands:
            band = _Band.of(self._stage_costs(kind, tp, in_flight, False)[0])
            ends = np.minimum(band.first[:, None] + np.arange(band.cost.shape[1])[None, :],
                              self.n_layers)
            self._compute_bands[key] = (band, ends)
        return self._compute_bands[key]

    def _after(self, before: Peer, blocks: Blocks) -> np.ndarray:
        return self._end if not blocks else self._best[(before, blocks)]

    def solve_many(self, pipelines: Iterable[Blocks], batch: int = 512) -> None:
        """Fill the memo for whole pipelines: their DP steps level by level (a suffix of k
        stages needs its suffix of k - 1), the steps of a level with bands of one width as
        one array operation, which spares the per-step overhead on some 200,000 steps. A
        suffix of d stages behind p others starts at a layer in [p, n_layers - d]: only
        those starts are computed (the least p over the pipelines that end in it)."""
        levels: dict[int, dict[tuple[Peer, Blocks], list]] = {}
        for blocks in pipelines:
            key: tuple[Peer, Blocks] = (None, blocks)
            depth = n_stages(blocks)
            lo = 0  # stages before the suffix: its least start
            while depth and self._lo.get(key, lo + 1) > lo:
                level = levels.setdefault(depth, {})
                if key in level:
                    if level[key][1] <= lo:
                        break  # another pipeline ends alike: its suffixes are listed
                    level[key][1] = lo
                else:
                    level[key] = [(peer(key[1]), drop_first_stage(key[1])), lo]
                key, depth, lo = level[key][0], depth - 1, lo + 1
        for depth in sorted(levels):
            groups: dict[int, list] = {}
            for key, (after, lo) in levels[depth].items():
                band = self.stage_band(*key, depth)
                last = 0 if key[0] is None else self.n_layers - depth
                groups.setdefault(band.cost.shape[1], []).append(
                    (key, after, lo, last - lo + 1, band))
            for items in groups.values():
                items.sort(key=lambda item: -item[3])
                for i in range(0, len(items), batch):
                    self._steps(items[i:i + batch])

    def _steps(self, items: list) -> None:
        """best[a] = min over ends b of max(first stage on [a, b), best of the rest from b),
        for a batch of (suffix, its rest, least start, starts, band) whose bands have one
        width; starts before the least are left inf. The choice of b is found again only
        for the few pipelines completed (best)."""
        n = self.n_layers + 1
        rows = max(items[0][3], 1)
        width = items[0][4].cost.shape[1]
        offsets = np.array([min(item[2], n - rows) for item in items])
        first = np.stack([item[4].first[o:o + rows] for o, item in zip(offsets, items,
                                                                          strict=True)])
        both = np.stack([item[4].cost[o:o + rows] for o, item in zip(offsets, items,
                                                                        strict=True)])
        # the rest's best from each end b = first[a] + j: rows of a sliding window over it
        after = np.full((len(items), n + width), np.inf)
        after[:, :n] = np.stack([self._after(*item[1]) for item in items])
        windows = np.lib.stride_tricks.sliding_window_view(after, width, axis=1)
        batch = np.arange(len(items))[:, None]
        np.maximum(both, windows[batch, first], out=both)
        # starts below each suffix's least read unlisted ends: left inf
        starts = offsets[:, None] + np.arange(rows)[None, :]
        lo = np.array([item[2] for item in items])
        best = np.full((len(items), n), np.inf)
        best[batch, starts] = np.where(starts >= lo[:, None], both.min(axis=2), np.inf)
        for i, item in enumerate(items):
            self._best[item[0]] = best[i]
            self._lo[item[0]] = item[2]

    def _choice(self, before: Peer, blocks: Blocks, a: int) -> int:
        """The end of the first stage of `blocks` from layer `a` in the best partition (the
        least such end, as np.argmin picks)."""
        band = self.stage_band(before, blocks)
        after = self._after(peer(blocks), drop_first_stage(blocks))
        first, width = int(band.first[a]), band.cost.shape[1]
        ends = np.full(width, np.inf)
        tail = after[first:first + width]
        ends[:len(tail)] = tail
        return first + int(np.maximum(band.cost[a], ends).argmin())

    def solved(self, blocks: Blocks) -> bool:
        """Whether the whole pipeline's partition is in the memo."""
        return (None, blocks) in self._best

    def slot_s(self, blocks: Blocks) -> float:
        """The slowest stage of the best partition; inf when nothing fits."""
        best = self._best.get((None, blocks))
        if best is None:
            self.solve_many([blocks])
            best = self._best[(None, blocks)]
        return float(best[0])

    def best(self, blocks: Blocks) -> Partition | None:
        if not np.isfinite(self.slot_s(blocks)):
            return None
        layers, modes, times, waits, fwds, bwds = [], [], [], [], [], []
        a, before, key = 0, None, blocks
        while key:
            b = self._choice(before, key, a)
            kind, tp, _, _ = key[0]
            cost, rc = self.stage_costs(kind, tp, n_stages(key))
            cur, nxt = peer(key), peer(drop_first_stage(key))
            fwd, bwd = self.comm.recv_s(before, cur, nxt)
            layers.append((a, b))
            modes.append(int(rc[a, b]))
            times.append(float(cost[a, b]))
            waits.append(float(fwd[a] + bwd[b]))
            hs_fwd, hs_bwd = self.comm.handshake_s(before, cur, nxt)
            fwds.append((hs_fwd, float(fwd[a]) - hs_fwd))
            bwds.append((hs_bwd, float(bwd[b]) - hs_bwd))
            a, before, key = b, peer(key), drop_first_stage(key)
        return Partition(layers=tuple(layers), modes=tuple(modes), stage_s=tuple(times),
                         wait_s=tuple(waits), forward_wait_s=tuple(fwds),
                         backward_wait_s=tuple(bwds))


class LayerBound:
    """Lower bounds on the slot of any pipeline, without partitioning it: a stage whose slot
    is s holds at most the layers of the longest range that fits in memory at its in-flight
    count and computes within s (in the fastest mode that fits; waits left out), so the
    least s at which the stages' longest ranges add up to the model bounds the slot below.
    The first stage's range starts at the first layer and the last's ends at the last (their
    inputs and outputs differ: the embedding's input is token ids); the others hold ranges
    between. A time grid of relative step `step` keeps it array sums per block; the bound is
    the grid point below the least covering time."""

    def __init__(self, partitioner: Partitioner, kinds: dict[str, list[int]],
                 step: float = 5e-3):
        self.partitioner = partitioner
        self.n_layers = partitioner.n_layers
        self._least: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # the grid: from the least time of one middle layer (below it, its 0 serves) to the
        # longest range's, geometric
        tables = [self.least_s(k, tp) for k, tps in kinds.items() for tp in tps]
        lo = min((float(middle[:, 1].min()) for _, middle, _ in tables), default=np.inf)
        lo = lo if 0 < lo < np.inf else 1e-6
        hi = max([lo] + [float(x[np.isfinite(x)].max()) for t in tables for x in t])
        points = int(np.ceil(np.log(hi / lo) / np.log1p(step))) + 1
        self.grid = np.concatenate([[0.0], lo * (1 + step) ** np.arange(points), [np.inf]])
        self._most: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def least_s(self, kind: str, tp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[f, L]: the least seconds of a stage of `kind` holding L layers with f micro-batches
        in flight (inf where no such range fits), for the first stage (layers 0 .. L - 1), a
        middle one (inside 1 .. n - 2) and the last (n - L .. n - 1); each made nondecreasing
        in L (the least over L or more: a looser bound)."""
        if (kind, tp) not in self._least:
            t = self.partitioner.stage_tables(kind, tp)
            n = self.n_layers
            modes = (PLAIN, REGATHER, RECOMPUTE)  # every mode the partitioner may choose
            times = np.stack([t.time_s[m] for m in modes])
            # its slack left out: a looser test
            most = np.stack([most_in_flight(t, m, t.capacity_bytes) for m in modes])
            flights = np.arange(n + 1)
            inf = np.full((n + 1, 1), np.inf)
            every = np.arange(1, n + 1)
            # ranges [0, L) and [n - L, n), each L a row of its modes
            first = np.hstack([inf, _least_fitting(times[:, 0, every].T,
                                                   most[:, 0, every].T, flights)])
            last = np.hstack([inf, _least_fitting(times[:, n - every, n].T,
                                                  most[:, n - every, n].T, flights)])
            # ranges [a, a + L) inside 1 .. n - 1 (L <= n - 2): a row of every mode and start
            # per L
            middle = np.full((n + 1, n + 1), np.inf)
            if n > 2:
                starts, layers = np.meshgrid(np.arange(1, n - 1), np.arange(1, n - 1))
                ends = np.minimum(starts + layers, n)
                inside = starts + layers <= n - 1
                cost = np.where(inside, times[:, starts, ends], np.inf).transpose(1, 0, 2)
                fits = np.where(inside, most[:, starts, ends], -1).transpose(1, 0, 2)
                middle[:, 1:n - 1] = _least_fitting(cost.reshape(n - 2, -1),
                                                    fits.reshape(n - 2, -1), flights)
            for x in (first, middle, last):
                x[:, 0] = 0.0
            first, middle, last = (np.minimum.accumulate(x[:, ::-1], axis=1)[:, ::-1]
                                   for x in (first, middle, last))
            self._least[(kind, tp)] = (first, middle, last)
        return self._least[(kind, tp)]

    def _layers(self, kind: str, tp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[f, g]: the most layers a first, middle and last stage hold within grid time g
        with f micro-batches in flight; the middle ones summed over in-flight counts 1 .. f."""
        if (kind, tp) not in self._most:
            def most(least: np.ndarray) -> np.ndarray:
                return np.stack([np.searchsorted(row, self.grid, side="right") - 1
                                 for row in least]).astype(np.int32)

            first, middle, last = self.least_s(kind, tp)
            summed = most(middle)
            summed[0] = 0
            self._most[(kind, tp)] = (most(first), np.cumsum(summed, axis=0, dtype=np.int32),
                                      most(last))
        return self._most[(kind, tp)]

    def slot_s(self, blocks: Blocks) -> float:
        stages = n_stages(blocks)
        if stages > self.n_layers:
            return np.inf  # a stage without a layer
        first_kind, first_tp = blocks[0][:2]
        if stages == 1:
            total = self._layers(first_kind, first_tp)[0][1].copy()
        else:
            # the stage d from the end holds d micro-batches in flight (1F1B)
            total = self._layers(first_kind, first_tp)[0][stages] \
                + self._layers(*blocks[-1][:2])[2][1]
            before = 0
            for kind, tp, count, _ in blocks:
                hi = min(stages - before, stages - 1)  # middle stages: in flight 2 .. S - 1
                lo = max(stages - before - count + 1, 2)
                if hi >= lo:
                    summed = self._layers(kind, tp)[1]
                    total = total + summed[hi] - summed[lo - 1]
                before += count
        covers = total >= self.n_layers
        if not covers[-1]:
            return np.inf  # no split of the layers fits
        found = int(covers.argmax())
        return float(self.grid[found - 1]) if found > 0 else 0.0


def _least_fitting(cost: np.ndarray, fits: np.ndarray, flights: np.ndarray) -> np.ndarray:
    """[f, r]: the least cost of row r among its entries whose fit (the most micro-batches
    in flight they hold) is at least f, for f in `flights`; inf where none. Entries sorted by
    fit, most first: the answer is the running least at the last entry that fits f."""
    order = np.argsort(-fits, axis=1, kind="stable")
    fit = np.take_along_axis(fits, order, axis=1)
    least = np.minimum.accumulate(np.take_along_axis(cost, order, axis=1), axis=1)
    # [r, f]: the entries of row r that fit f, from a histogram of fits (clipped to
    # -1 .. F, F the last of `flights`) summed from the top
    top = int(flights[-1])
    rows = fit.shape[0]
    bins = (np.clip(fit, -1, top).astype(np.int64) + 1) + (top + 2) * np.arange(rows)[:, None]
    hist = np.bincount(bins.ravel(), minlength=rows * (top + 2)).reshape(rows, top + 2)
    count = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1 + flights]
    out = np.take_along_axis(least, np.maximum(count - 1, 0), axis=1)
    return np.where(count > 0, out, np.inf).T


class ScaledSlots:
    """Lower bounds on the slots of a larger micro-batch size, from a smaller size's exact
    partitions (LayerBound's where the smaller has none). For a factor r,
    every stage time per range (compute with or without recomputation) at the larger size is
    at least r times the smaller's less some d_c, every wait at least r times less d_w (the
    figures of the two tables say how much); a range that fits in memory at the larger size
    fits at the smaller. So the larger size's best
    partition, priced at the smaller size, bounds: slot >= r * smaller slot - d_c - 2 d_w,
    for every r tried (those near the typical growth, and 1)."""

    def __init__(self, smaller: Partitioner, larger: Partitioner, tps: dict[str, list[int]]):
        self.smaller = smaller
        self.larger = larger
        self.unseen = LayerBound(larger, tps)
        compute, waits = _pairs(smaller, larger, tps)
        ratios = compute[1] / compute[0]
        self.terms = []
        for r in {1.0, *np.quantile(ratios, (0.01, 0.05, 0.2, 0.5)).tolist()}:
            d_c = max(float((r * compute[0] - compute[1]).max(initial=0.0)), 0.0)
            d_w = max(float((r * waits[0] - waits[1]).max(initial=0.0)), 0.0)
            self.terms.append((r, d_c + 2 * d_w))

    def slot_s(self, blocks: Blocks) -> float:
        if not self.smaller.solved(blocks):
            return self.unseen.slot_s(blocks)
        slot = self.smaller.slot_s(blocks)
        if not np.isfinite(slot):
            return slot
        # never above the true slot by rounding
        return max(0.0, *(r * slot - d for r, d in self.terms)) * (1 - 1e-9)


def _pairs(smaller: Partitioner, larger: Partitioner, tps: dict[str, list[int]]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(smaller, larger) stage times of every range where the smaller is finite, and every
    wait, as two 2-row arrays."""
    compute = []
    for kind, sizes in tps.items():
        for tp in sizes:
            small, large = smaller.stage_tables(kind, tp), larger.stage_tables(kind, tp)
            for rc in (PLAIN, RECOMPUTE, REGATHER):
                ok = np.isfinite(small.time_s[rc])
                compute.append(np.stack([small.time_s[rc][ok], large.time_s[rc][ok]]))
    peers = [(kind, local) for kind in tps for local in (True, False)]
    # a wait depends only on the link and the sender's dtype: each such pair once (eight
    # kinds: 16 x 16 peer pairs, 40,000 waits, from some twenty pairs)
    senders: dict[tuple, str] = {}
    for x in peers:
        for y in peers:
            link = smaller.comm.link(x, y)
            for sender in {x[0], y[0]}:
                senders.setdefault((link, smaller.comm.dtypes[sender],
                                    larger.comm.dtypes[sender]), sender)
    waits = [(smaller.comm.wait_s(link, boundary, sender),
              larger.comm.wait_s(link, boundary, sender))
             for (link, _, _), sender in senders.items()
             for boundary in range(1, smaller.n_layers + 1)]
    return np.concatenate(compute, axis=1), np.array(waits).T

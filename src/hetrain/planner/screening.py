"""Pick the templates worth handing to the count program on large clusters.

Kept: the templates that finish the batch soonest on their own (every copy the cluster
allows), and those the LP relaxation of "can copies of these templates finish the batch by
time T" favours (copies continuous, each taking as many micro-batches as fit before T).
Bisecting T gives a lower bound on the pipeline time; at a few times around it the LP's
support and the templates with the best reduced cost under its device prices are kept
(column selection, as in cutting-stock).

A micro-batch size whose LP cannot beat the best plan so far even on lower bounds of its
slots (scaled from a smaller size's partitions, or partition.LayerBound's), over every shape
it would take (mixed ones of the tp sizes its bounds rank best), is left before any of its
shapes is partitioned; checked again with its single shapes exact, before its mixed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from hetrain.planner.templates import Template


def _per_copy(fill: np.ndarray, slot: np.ndarray, deadline_s: float,
              micro_batches: int) -> np.ndarray:
    return np.clip(np.floor((deadline_s - fill) / slot + 1e-9), 0, micro_batches)


class CoverLP:
    def __init__(self, templates: list[Template], capacity: dict[tuple[str, int], int],
                 micro_batches: int):
        self.templates = templates
        self.micro_batches = micro_batches
        self.keys = sorted(capacity)
        row = {key: i for i, key in enumerate(self.keys)}
        self.a = np.zeros((len(self.keys), len(templates)))
        for j, t in enumerate(templates):
            for key, need in t.demand.items():
                self.a[row[key], j] = need
        self.b = np.array([capacity[key] for key in self.keys], dtype=float)
        self.upper = np.array([t.n_max for t in templates], dtype=float)
        self.fill = np.array([t.fill_s for t in templates])
        self.slot = np.array([t.slot_s for t in templates])
        # templates with the same devices per copy and copy limit (the same kinds in other
        # orders, say) as one column
        columns = np.vstack([self.a, self.upper[None, :]]) if templates else np.zeros((1, 0))
        _, self.column, inverse = np.unique(columns, axis=1, return_index=True,
                                            return_inverse=True)
        self.member = inverse.reshape(-1)  # template -> its column

    def _program(self, deadline_s: float):
        """The relaxation at this deadline with a column per set of templates of the same
        devices, worth the most any member finishes: the same optimum as a column each, in
        a fraction of the time (3,790 columns instead of 9,323 on six kinds), and solved
        without HiGHS's presolve (half the time again). Returns (micro-batches each template
        finishes, its set's worth, the solution)."""
        k = _per_copy(self.fill, self.slot, deadline_s, self.micro_batches)
        worth = np.full(len(self.column), -1.0)
        np.maximum.at(worth, self.member, k)
        a, upper = self.a[:, self.column], self.upper[self.column]
        res = linprog(-worth, A_ub=a, b_ub=self.b,
                      bounds=np.column_stack([np.zeros(len(upper)), upper]), method="highs",
                      options={"presolve": False})
        return k, worth, res

    def covered(self, deadline_s: float) -> float:
        """Micro-batches the relaxation finishes by this deadline."""
        return -self._program(deadline_s)[2].fun

    def per_copy(self, deadline_s: float) -> np.ndarray:
        """Micro-batches one copy of each template finishes by the deadline."""
        return _per_copy(self.fill, self.slot, deadline_s, self.micro_batches)

    def solve(self, deadline_s: float):
        """(micro-batches covered, copies, reduced cost per template) at this deadline: a
        set's copies go to its first member that finishes the set's most, and each
        template's reduced cost is from the device prices of the solution by sets."""
        k, worth, res = self._program(deadline_s)
        prices = -res.ineqlin.marginals
        x = np.zeros(len(self.templates))
        top = np.flatnonzero(k == worth[self.member])[::-1]
        first = np.full(len(self.column), -1)
        first[self.member[top]] = top  # the last written, the first member, wins
        x[first[first >= 0]] = res.x[first >= 0]
        return -res.fun, x, k - prices @ self.a

    def covers(self, deadline_s: float) -> bool:
        """Whether the relaxation finishes the batch by the deadline (always, for inf)."""
        return not np.isfinite(deadline_s) or self.covered(deadline_s) >= self.micro_batches

    def lower_bound_s(self, tolerance: float = 1e-3) -> float:
        """A deadline within `tolerance` above the least one by which the relaxation covers
        the batch; the returned bound is the infeasible side, so it is a true lower bound."""
        hi = min(t.route_s(math.ceil(self.micro_batches / t.n_max)) for t in self.templates)
        lo = min(t.route_s(1) for t in self.templates) * (1 - 1e-12)
        while hi - lo > tolerance * hi:
            mid = (lo + hi) / 2
            if self.covered(mid) >= self.micro_batches:
                hi = mid
            else:
                lo = mid
        return lo


@dataclass(frozen=True)
class Screen:
    keep: list[int]  # indices of the templates worth a full look
    bound_s: float  # no plan from these templates has a faster pipeline than this


def screen_templates(templates: list[Template], capacity: dict[tuple[str, int], int],
                     micro_batches: int, keep: int = 40,
                     margins: tuple[float, ...] = (1.0, 1.02, 1.05, 1.1, 1.25)) -> Screen:
    """At most about `keep` templates: the LP's support and best reduced costs at a few
    deadlines, and the LP's lower bound on the pipeline time."""
    lp = CoverLP(templates, capacity, micro_batches)
    bound = lp.lower_bound_s()
    if len(templates) <= keep:
        return Screen(list(range(len(templates))), bound)
    alone = [t.route_s(math.ceil(micro_batches / t.n_max)) for t in templates]
    chosen: dict[int, None] = dict.fromkeys(int(i) for i in np.argsort(alone)[:keep // 4])
    per_margin = max(keep // len(margins), 1)
    for margin in margins:
        _, copies, reduced = lp.solve(bound * margin)
        for i in np.flatnonzero(copies > 1e-9):
            chosen[int(i)] = None
        # a template whose copy finishes no micro-batch by this deadline adds nothing there,
        # though its reduced cost ties with the best where its devices are left unpriced
        useful = lp.per_copy(bound * margin) > 0
        for i in np.argsort(-reduced)[:per_margin]:
            if useful[i]:
                chosen[int(i)] = None
    return Screen(list(chosen), bound)


def beyond_reach(outlines: list[Template], capacity: dict[tuple[str, int], int],
                 micro_batches: int, beat_s: float) -> bool:
    """Whether the LP relaxation over `outlines` (lower bounds on the slots of every shape a
    micro-batch size would take) cannot finish the batch within `beat_s`: then no plan of
    that size beats `beat_s`, and none of its shapes needs a partition."""
    return (np.isfinite(beat_s) and bool(outlines)
            and not CoverLP(outlines, capacity, micro_batches).covers(beat_s))

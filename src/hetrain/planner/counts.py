"""How many copies of each template to run, and how many micro-batches each takes.

A plan of u templates, template t as n copies: its pipeline time is the latest copy's 1F1B
time (micro-batches split evenly), its tail the slowest group's sync + optimizer at (n, u).
Whether copies can finish the batch by a deadline with every tail below a cap is a small
integer program over the devices per kind (and per tensor-parallel size, so groups pack into
nodes), solved by HiGHS (scipy.optimize.milp). choose_counts walks the staircase of
(deadline, tail cap) pairs to the least sum, which makes it exact over the templates given
(unless a program needs more than NODE_LIMIT branch-and-bound nodes, or the budget of
programs runs out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from hetrain.cluster.topology import Cluster
from hetrain.planner.templates import Template, tp_capacity

# Branch-and-bound nodes one program may take: a program cut there counts as finding no
# choice (its deadline or tail is then passed over). Uneven clusters make a few programs of
# thousands of nodes (six kinds, 2,048 chips, odd counts per kind: 8,703 nodes in 5.2 s, proofs
# of infeasibility of 2.5-4.9 s) among ones of a single node; a limit, unlike a time limit,
# gives the same answer on every machine.
NODE_LIMIT = 200


class OutOfPrograms(Exception):
    """The budget of integer programs is spent."""


@dataclass(frozen=True)
class Choice:
    template: int  # index into the template list
    copies: int
    micro_batches: int  # over all copies


@dataclass(frozen=True)
class CountSolution:
    choices: tuple[Choice, ...]
    pipeline_s: float
    tail_s: float

    @property
    def step_s(self) -> float:
        return self.pipeline_s + self.tail_s


def evaluate(templates: list[Template], choices: tuple[Choice, ...]) -> CountSolution:
    """The objective of a choice, from the templates alone (micro-batches split evenly)."""
    u = len(choices)
    pipeline = max(templates[c.template].route_s(math.ceil(c.micro_batches / c.copies))
                   for c in choices)
    tail = max(float(templates[c.template].tail_s[c.copies - 1, u - 1]) for c in choices)
    return CountSolution(choices=choices, pipeline_s=pipeline, tail_s=tail)


def capacities(templates: list[Template], cluster: Cluster) -> dict[tuple[str, int], int]:
    """Devices each (kind, tensor-parallel size) bound of the program may fill."""
    keys = {key for tpl in templates for key in tpl.demand}
    return {(kind, t): tp_capacity(cluster, kind, t) for kind, t in keys}


class _Rows:
    """Sparse constraint rows: lb <= sum(vals * x[cols]) <= ub."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []

    def add(self, terms: list[tuple[int, float]], lb: float, ub: float) -> None:
        r = len(self.lb)
        for col, val in terms:
            self.rows.append(r)
            self.cols.append(col)
            self.vals.append(val)
        self.lb.append(lb)
        self.ub.append(ub)

    def constraint(self, n_vars: int) -> LinearConstraint:
        a = coo_array((self.vals, (self.rows, self.cols)), shape=(len(self.lb), n_vars))
        return LinearConstraint(a.tocsr(), np.array(self.lb), np.array(self.ub))


class CountProblem:
    """The templates' figures as arrays, and the feasibility programs over them."""

    def __init__(self, templates: list[Template], micro_batches: int,
                 capacity: dict[tuple[str, int], int], max_shapes: int,
                 max_programs: int | None = None):
        self.templates = templates
        self.best: CountSolution | None = None  # the best plan found so far
        self._answers: dict[tuple[float, float], tuple[Choice, ...] | None] = {}
        self.programs_left = np.inf if max_programs is None else max_programs
        self.m = micro_batches
        self.shapes = min(max_shapes, len(templates), micro_batches)
        self.slot = np.array([t.slot_s for t in templates])
        self.fill = np.array([t.fill_s for t in templates])
        self.n_max = np.array([min(t.n_max, micro_batches) for t in templates])
        keys = sorted(capacity)
        self.demand = np.array([[t.demand.get(k, 0) for t in templates] for k in keys],
                               dtype=float).reshape(len(keys), len(templates))
        self.capacity = np.array([capacity[k] for k in keys], dtype=float)
        # tails[t, n - 1, u - 1], inf where t has no n copies
        self.tails = np.full((len(templates), int(self.n_max.max()), self.shapes), np.inf)
        for i, t in enumerate(templates):
            self.tails[i, :self.n_max[i]] = t.tail_s[:self.n_max[i], :self.shapes]

    def route_s(self, micro_batches: np.ndarray) -> np.ndarray:
        """Template.route_s, per template, with the same float operations."""
        return self.fill + micro_batches * self.slot

    def per_copy(self, deadline_s: float) -> np.ndarray:
        """Micro-batches one copy of each template finishes by the deadline (at most m)."""
        q = np.floor((deadline_s - self.fill) / self.slot)
        q = np.clip(q, 0, self.m)
        q = np.where(self.route_s(q + 1) <= deadline_s, q + 1, q)  # undo rounding, either way
        q = np.where((q > 0) & (self.route_s(q) > deadline_s), q - 1, q)
        return np.clip(q, 0, self.m).astype(int)

    def deadlines(self, above_s: float, below_s: float) -> np.ndarray:
        """Every time in (above, below) at which a template's copy finishes a micro-batch."""
        lo = np.maximum(np.ceil((above_s - self.fill) / self.slot) - 1, 1)
        hi = np.minimum(np.floor((below_s - self.fill) / self.slot) + 1, self.m)
        out = [np.empty(0)]
        for t in range(len(self.slot)):
            if hi[t] >= lo[t]:
                q = np.arange(lo[t], hi[t] + 1)
                out.append(self.fill[t] + q * self.slot[t])
        times = np.unique(np.concatenate(out))
        return times[(times > above_s) & (times < below_s)]

    def select(self, deadline_s: float, tail_cap: float) -> tuple[Choice, ...] | None:
        """Copies that finish the batch by the deadline with every tail below the cap. A
        question asked before (the staircase asks again for the choice its bisection found)
        is answered from memory, though it still counts against the budget."""
        if self.programs_left <= 0:
            raise OutOfPrograms
        self.programs_left -= 1
        key = (deadline_s, tail_cap)
        if key not in self._answers:
            self._answers[key] = self._select(deadline_s, tail_cap)
        return self._answers[key]

    def _select(self, deadline_s: float, tail_cap: float) -> tuple[Choice, ...] | None:
        per_copy = self.per_copy(deadline_s)
        allowed = (self.tails < tail_cap) & (per_copy > 0)[:, None, None]
        prefix = np.cumprod(allowed, axis=1).sum(axis=1)  # [t, u]: copies 1..k all allowed
        if np.array_equal(prefix, allowed.sum(axis=1)):
            counts = self._select_counts(per_copy, prefix)
        else:  # a tail shrinks as copies grow (slow links inside a node): one binary per n
            counts = self._select_pairs(per_copy, allowed)
        if counts is None:
            return None
        return self._split(counts, per_copy)

    def _common_rows(self, rows: _Rows, w0: int) -> None:
        rows.add([(w0 + u, 1.0) for u in range(self.shapes)], 1.0, 1.0)

    def _select_counts(self, per_copy: np.ndarray, prefix: np.ndarray) -> dict[int, int] | None:
        """Integer copies n[t], binary used[t], binary w[u] (the plan has u + 1 templates)."""
        live = np.flatnonzero(prefix.max(axis=1) > 0)
        if len(live) == 0 or per_copy[live] @ self.n_max[live] < self.m:
            return None
        k = len(live)
        y0, w0 = k, 2 * k
        n_vars = w0 + self.shapes
        rows = _Rows()
        for i, t in enumerate(live):
            rows.add([(i, 1.0)] + [(w0 + u, -float(prefix[t, u])) for u in range(self.shapes)
                                   if prefix[t, u]], -np.inf, 0.0)
            rows.add([(i, 1.0), (y0 + i, -1.0)], 0.0, np.inf)
            rows.add([(i, 1.0), (y0 + i, -float(self.m))], -np.inf, 0.0)
        rows.add([(y0 + i, 1.0) for i in range(k)]
                 + [(w0 + u, -float(u + 1)) for u in range(self.shapes)], 0.0, 0.0)
        self._common_rows(rows, w0)
        rows.add([(i, 1.0) for i in range(k)], -np.inf, self.m)
        rows.add([(i, float(per_copy[t])) for i, t in enumerate(live)], self.m, np.inf)
        for demand, cap in zip(self.demand[:, live], self.capacity, strict=True):
            if demand.any():
                rows.add([(i, float(v)) for i, v in enumerate(demand) if v], -np.inf, cap)
        upper = np.concatenate([self.n_max[live], np.ones(k + self.shapes)]).astype(float)
        res = milp(np.zeros(n_vars), constraints=rows.constraint(n_vars),
                   integrality=np.ones(n_vars), bounds=Bounds(np.zeros(n_vars), upper),
                   options={"node_limit": NODE_LIMIT})
        if res.x is None:
            return None
        n = np.round(res.x[:k]).astype(int)
        return {int(t): int(c) for t, c in zip(live, n, strict=True) if c > 0}

    def _select_pairs(self, per_copy: np.ndarray, allowed: np.ndarray) -> dict[int, int] | None:
        """Binary x[t, n] for each allowed (template, copies), binary w[u]."""
        pairs = [(int(t), int(n)) for t, n in zip(*np.nonzero(allowed.any(axis=2)), strict=True)]
        if not pairs:
            return None
        w0 = len(pairs)
        n_vars = w0 + self.shapes
        rows = _Rows()
        by_tpl: dict[int, list[int]] = {}
        for i, (t, n) in enumerate(pairs):
            by_tpl.setdefault(t, []).append(i)
            rows.add([(i, 1.0)] + [(w0 + u, -1.0) for u in range(self.shapes) if allowed[t, n, u]],
                     -np.inf, 0.0)
        for idx in by_tpl.values():
            rows.add([(i, 1.0) for i in idx], -np.inf, 1.0)
        rows.add([(i, 1.0) for i in range(w0)]
                 + [(w0 + u, -float(u + 1)) for u in range(self.shapes)], 0.0, 0.0)
        self._common_rows(rows, w0)
        rows.add([(i, float(n + 1)) for i, (_, n) in enumerate(pairs)], -np.inf, self.m)
        rows.add([(i, float((n + 1) * per_copy[t])) for i, (t, n) in enumerate(pairs)],
                 self.m, np.inf)
        for demand, cap in zip(self.demand, self.capacity, strict=True):
            terms = [(i, float(demand[t] * (n + 1))) for i, (t, n) in enumerate(pairs) if demand[t]]
            if terms:
                rows.add(terms, -np.inf, cap)
        res = milp(np.zeros(n_vars), constraints=rows.constraint(n_vars),
                   integrality=np.ones(n_vars), bounds=Bounds(np.zeros(n_vars), np.ones(n_vars)),
                   options={"node_limit": NODE_LIMIT})
        if res.x is None:
            return None
        return {t: n + 1 for i, (t, n) in enumerate(pairs) if res.x[i] > 0.5}

    def _split(self, counts: dict[int, int], per_copy: np.ndarray) -> tuple[Choice, ...]:
        """Each copy takes one micro-batch, then the rest fill copies up to the deadline."""
        share = dict(counts)
        left = self.m - sum(share.values())
        for t, n in counts.items():
            extra = min(left, int(n * per_copy[t]) - share[t])
            share[t] += extra
            left -= extra
        assert left == 0, "the selection does not cover the batch"
        return tuple(Choice(t, n, share[t]) for t, n in counts.items())


def best_single(templates: list[Template], micro_batches: int) -> CountSolution | None:
    """The best plan of one template: every copy count tried, micro-batches split evenly."""
    singles = best_singles(templates, micro_batches, within=0.0, most=1)
    return singles[0] if singles else None


def best_singles(templates: list[Template], micro_batches: int, within: float,
                 most: int) -> list[CountSolution]:
    """Each template's best plan of its own (every copy count tried, micro-batches split
    evenly), fastest first: those within `within` (a fraction) of the fastest, `most` of
    them. Templates' times are closed forms; near ties are for the final pricing to tell."""
    per_template = []
    for t, tpl in enumerate(templates):
        best = None
        for n in range(1, min(tpl.n_max, micro_batches) + 1):
            sol = evaluate(templates, (Choice(t, n, micro_batches),))
            if best is None or sol.step_s < best.step_s:
                best = sol
        if best is not None:
            per_template.append(best)
    per_template.sort(key=lambda sol: sol.step_s)
    if not per_template:
        return []
    limit = per_template[0].step_s * (1 + within)
    return [sol for sol in per_template if sol.step_s <= limit][:most]


def choose_counts(templates: list[Template], micro_batches: int,
                  capacity: dict[tuple[str, int], int], max_shapes: int,
                  pipeline_bound_s: float = 0.0,
                  max_programs: int | None = None) -> CountSolution | None:
    """The optimal copies and micro-batch split, or None when nothing covers the batch.

    Start from the best single-template plan. Then repeatedly: the least deadline at which
    copies with tails below the cap finish the batch (bisection over the times at which copies
    finish micro-batches, each step an integer program); at that deadline the least tail
    (bisection over tail values); then lower the cap below that tail. Stop when no deadline
    can beat the best. Deadlines at or below `pipeline_bound_s` are known not to cover.
    With `max_programs`, stop after that many programs with the best found so far, and
    before a step (a bisection over deadlines, then one over tails) the programs left
    cannot finish: on large clusters the budget used to run out inside the first step's
    tail bisection, so the step found nothing and cost 2-5 s."""
    if not templates:
        return None
    problem = CountProblem(templates, micro_batches, capacity, max_shapes, max_programs)
    best = best_single(templates, micro_batches)
    assert best is not None
    try:
        return _staircase(problem, best, pipeline_bound_s)
    except OutOfPrograms:
        return problem.best


def _staircase(problem: CountProblem, best: CountSolution,
               pipeline_bound_s: float) -> CountSolution:
    problem.best = best
    floor_s = float(problem.tails.min())
    cap, after_s = np.inf, pipeline_bound_s
    while True:
        # a lower cap only makes covering harder: no earlier deadline than the last can work
        times = problem.deadlines(after_s, problem.best.step_s - floor_s)
        # a step that the budget cannot finish would change nothing: not started
        step = _programs(len(times)) + _programs(int(np.unique(
            problem.tails[problem.tails < cap]).size)) + 1
        if step > problem.programs_left:
            return problem.best
        deadline = _least(times, lambda d, c=cap: problem.select(d, c) is not None)
        if deadline is None:
            return problem.best
        after_s = np.nextafter(deadline, -np.inf)
        # only tails that would beat the best at this deadline are worth a look
        room = min(cap, problem.best.step_s - deadline)
        tails = problem.tails[problem.tails < room]
        tail = _least(np.unique(tails), lambda z, d=deadline: problem.select(
            d, np.nextafter(z, np.inf)) is not None)
        if tail is None:
            cap = room  # nothing at this deadline beats the best; later ones need less tail
            continue
        choices = problem.select(deadline, np.nextafter(tail, np.inf))
        assert choices is not None
        sol = evaluate(problem.templates, choices)
        if sol.step_s < problem.best.step_s:
            problem.best = sol
        cap = tail


def _programs(n: int) -> int:
    """The most tests _least makes on n values."""
    return 1 + math.ceil(math.log2(n)) if n > 1 else n


def _least(values: np.ndarray, ok) -> float | None:
    """The least of the sorted `values` for which the monotone test `ok` holds, if any."""
    if len(values) == 0 or not ok(values[-1]):
        return None
    lo, hi = -1, len(values) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(values[mid]):
            hi = mid
        else:
            lo = mid
    return float(values[hi])

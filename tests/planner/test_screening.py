"""Screening on large clusters: which templates the count program gets to see."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linprog

from hetrain.planner.screening import CoverLP, screen_templates
from hetrain.planner.templates import Block, Template


def _template(kind: str, devices: int, slot_s: float, fill_s: float, n_max: int) -> Template:
    return Template(blocks=(Block(kind, 1, devices),), slot_s=slot_s, devices={kind: devices},
                    demand={(kind, 1): devices}, n_max=n_max, fill_s=fill_s)


def test_screening_leaves_templates_that_finish_nothing():
    """A template whose copy finishes no micro-batch by a screening deadline adds nothing to
    the relaxation there; on devices the relaxation leaves unpriced (a kind's few odd
    devices) its reduced cost still ties with the best ones, and it used to be kept (a
    67-stage MLU370 pipeline of 64 s fill among plans of 11 s, completed at 0.3 s each)."""
    good = [_template("A", d, 0.1 * d / 4, 0.2, 64) for d in (2, 4, 8)] + \
        [_template("A", 4, 0.1 + 0.01 * i, 0.2, 64) for i in range(1, 45)]
    slow = [_template("B", d, 5.0, 60.0, 1) for d in (1, 2, 3)]  # B: 3 devices
    templates = good + slow
    capacity = {("A", 1): 32, ("B", 1): 3}
    lp = CoverLP(templates, capacity, 64)
    bound = lp.lower_bound_s()
    _, _, reduced = lp.solve(bound)
    # the premise: nothing finishes on the slow templates, yet their reduced cost is the best
    assert all(t.route_s(1) > bound * 1.25 for t in slow)
    assert np.isclose(max(reduced[len(good):]), reduced.max())
    screen = screen_templates(templates, capacity, 64, keep=40)
    assert not set(screen.keep) & set(range(len(good), len(templates)))
    assert screen.keep  # the relaxation's own support stays
    assert screen.bound_s == bound


def test_the_relaxation_solved_by_columns_gives_each_template_its_copies():
    """`solve` runs the LP with one column per set of templates of the same devices (each
    worth the most a member finishes); the copies go to such a member, and they are a
    solution of the LP over every template with the same value."""
    rng = np.random.default_rng(3)
    templates = [_template(kind, d, float(rng.uniform(0.05, 0.4)), float(rng.uniform(0, 1)), n)
                 for kind, d, n in [("A", 2, 8), ("A", 2, 8), ("A", 4, 4), ("B", 1, 6),
                                    ("B", 1, 6), ("B", 1, 6), ("B", 2, 3), ("A", 4, 4)]]
    capacity = {("A", 1): 16, ("B", 1): 6}
    lp = CoverLP(templates, capacity, 40)
    for deadline in (1.0, 2.0, 4.0):
        value, copies, _ = lp.solve(deadline)
        k = lp.per_copy(deadline)
        assert value == pytest.approx(float(k @ copies))
        assert np.all(lp.a @ copies <= lp.b + 1e-9) and np.all(copies <= lp.upper + 1e-9)
        # the LP over every template, a column each, reaches no more
        full = linprog(-k, A_ub=lp.a, b_ub=lp.b, method="highs",
                       bounds=np.column_stack([np.zeros(len(lp.upper)), lp.upper]))
        assert value == pytest.approx(-full.fun)
        for i in np.flatnonzero(copies > 1e-9):  # a member finishing its set's most
            same = lp.member == lp.member[i]
            assert k[i] == k[same].max()

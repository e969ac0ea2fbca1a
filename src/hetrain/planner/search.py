"""The search: the fastest memory-feasible plan for a cluster, a model and a global batch.

For each micro-batch size: enumerate pipeline shapes (each kind once, as a block of stages
with one tp), split each one's layers by DP (partition.py), choose copies and micro-batch
counts with integer programs (counts.py), and place the result on devices (placement.py).

Small clusters get every shape and up to one template per device: the plan is then optimal
under the estimate among plans whose pipelines are split by the DP (`exhaustive`). Large
ones get every single-kind shape plus mixed shapes that give each copy an equal share of each
kind's devices (with each kind's best tp sizes); an LP relaxation screens them down to a few
dozen, a budget bounds the integer programs, and micro-batch sizes whose LP bound cannot beat
the best so far are skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.cost.tables import TableCache
from hetrain.errors import PlanError, PlannerError
from hetrain.gcpause import cyclic_gc_paused
from hetrain.plan.schedule import HeldOver
from hetrain.plan.types import Plan, ScheduleKind
from hetrain.plan.validate import check_memory, plan_memory_fn, validate_plan
from hetrain.planner.counts import (
    Choice,
    CountSolution,
    best_singles,
    capacities,
    choose_counts,
    evaluate,
)
from hetrain.planner.estimate import StepEstimate, estimate_step, route_signature
from hetrain.planner.feasibility import explain_infeasible
from hetrain.planner.links import BoundaryComm, LinkModel
from hetrain.planner.options import SearchOptions, kind_dtypes, plan_kinds
from hetrain.planner.partition import MEMORY_SLACK, Partitioner, ScaledSlots
from hetrain.planner.placement import place_plan
from hetrain.planner.screening import CoverLP, beyond_reach, screen_templates
from hetrain.planner.templates import (
    Block,
    Shape,
    Template,
    TemplateBuilder,
    all_shapes,
    all_shapes_count,
    block_options,
    kind_orders,
    proportional_shapes,
    run_route_s,
    tp_combination,
    tp_options,
)

# Mixed shapes of all kinds try every tp combination in the default kind order, and the best
# of them in each further order (eight kinds: 2,304 combinations and orders took 28 s on
# 2,048 chips; the plans of the example clusters use a combination ranked within the first 3).
OTHER_ORDER_COMBINATIONS = 8
# The final pricing also takes the best single-shape plans (_best_single_shapes). A
# template's fill and cycle come from a short run (TemplateBuilder._fill_s) and miss by up to
# a few percent on shapes whose steady state drifts, so the single shapes within RERUN_WITHIN
# of the best closed form (at most RERUN_MOST), and the RERUN_1F1B best under 1F1B, are
# ranked again by a run of one copy at their own micro-batches (templates.run_route_s: at
# most 2 S past the warm-up, milliseconds to a tenth of a second), and those within NEAR_TIE
# of the best of that ranking (at most NEAR_TIES) are priced: a pricing costs 0.3-1.1 s on
# 2,000 chips. A single-shape answer that NEAR_TIES of them beat by such runs is left out as
# they are (an eight-kind 1,019-chip cluster priced four 7-copy plans, 4.5 s, for one).
RERUN_WITHIN = 0.25
RERUN_MOST = 4
RERUN_1F1B = 2
NEAR_TIE = 0.005
NEAR_TIES = 2
# A zero-bubble answer is priced under 1F1B too only when a run of its copies under 1F1B
# comes within RERUN_1F1B_TIE of their run under zero-bubble (37 answers on 36 clusters: 1F1B
# priced faster on 6, their runs within 1.03 %; 24 pricings of up to 0.8 s spared).
RERUN_1F1B_TIE = 0.02
# Micro-batch sizes are compared by their answers' closed forms too; an answer of another
# size within SIZE_TIE of the best is priced as well when a run of its copies beats the
# best's (tiny models, where transfers are most of a slot, miss by up to 9 % at
# micro-batch 2; pricing every such answer cost 1.7 s on eight kinds).
SIZE_TIE = 0.10
# Sequence pieces are priced while their runs together have at most this many micro-batch
# x stage x piece units (estimate.schedule_times: 45-50 us each; 0.8 s at most).
PIECES_UNITS = 16_000
# Half layers (search._in_halves): templates completed over half layers, when some shape's
# slowest stage gains this share (mixed-1280: its answer's shape ranks first of 22 by its
# slot over half layers, and gains 2.3 %).
HALF_LAYER_TEMPLATES = 6
HALF_LAYER_GAIN = 0.005


@dataclass(frozen=True)
class Candidates:
    """Everything the search built for one micro-batch size."""

    micro_batch_size: int
    micro_batches: int
    templates: list[Template]
    capacity: dict[tuple[str, int], int]
    max_shapes: int
    exhaustive: bool
    pipeline_bound_s: float  # no plan from the shapes considered has a faster pipeline
    # (template index, schedule kind, micro-batches per copy) -> run_route_s: the answer's
    # copies are run for the singles' bar, the 1F1B check, the slotted answer's bar and the
    # micro-batch-size hedge
    runs: dict[tuple[int, str, int], float] = field(default_factory=dict, compare=False,
                                                   repr=False)

    def run_s(self, template: int, model: str, schedule: ScheduleKind, micro_batches: int
              ) -> float:
        """templates.run_route_s of one of its templates, run once per search."""
        key = (template, schedule, micro_batches)
        if key not in self.runs:
            self.runs[key] = run_route_s(self.templates[template], model, schedule,
                                         micro_batches)
        return self.runs[key]


@dataclass(frozen=True)
class SearchResult:
    plan: Plan
    estimate: StepEstimate
    search_s: float
    exhaustive: bool  # every shape tried, so `solution` is optimal under the closed forms
    templates_built: int  # memory-feasible templates completed, over all micro-batch sizes
    candidates: Candidates  # of the micro-batch size of `solution`
    solution: CountSolution  # the count program's best by the closed forms (the plan is the
    # best priced of it and the alternatives _priced and the hedges add)


def build_candidates(cluster: Cluster, cost: CostModel, tables: TableCache, global_batch: int,
                     micro_batch_size: int, options: SearchOptions,
                     beat_s: float = np.inf, optimizer_shards: int = 1,
                     partitioners: dict[int, Partitioner] | None = None,
                     combos: dict[frozenset[tuple[str, int]], float] | None = None
                     ) -> Candidates:
    """Templates for one micro-batch size. Every shape when there are few, else single-kind
    shapes and proportional mixed ones. Unless the search is exhaustive, only the templates
    that screening keeps are completed, and none when not even the LP relaxation finishes
    the batch within `beat_s`. `partitioners` (by micro-batch size) keeps each size's
    partitions, from which larger sizes get lower bounds. `combos` keeps the ranking of the
    tp combinations of the set of all kinds (by their shapes in the default kind order, at
    the first size that had them), of which the further kind orders try the best
    OTHER_ORDER_COMBINATIONS available at this size."""
    counts = plan_kinds(cluster, options)
    n_layers = cost.spec.n_layers
    tps = {k: tp_options(cluster, k, options.tp_sizes) for k in counts}
    micro_batches = global_batch // micro_batch_size
    partitioners = {} if partitioners is None else partitioners
    smaller = max((m for m in partitioners if m < micro_batch_size), default=None)
    max_shapes = min(sum(counts.values()), options.max_shapes)
    every_shape = all_shapes_count(counts, tps, n_layers) <= options.shape_budget
    exhaustive = every_shape and max_shapes == sum(counts.values())
    builder = _template_builder(cluster, cost, tables, options, micro_batch_size,
                                micro_batches, max_shapes, optimizer_shards)
    partitioner = builder.partitioner
    if exhaustive:
        templates = [t for t in map(builder.build, all_shapes(counts, tps, n_layers)) if t]
        capacity = capacities(templates, cluster)
        bound = CoverLP(templates, capacity, micro_batches).lower_bound_s() if templates else 0.0
        return Candidates(micro_batch_size, micro_batches, templates, capacity, max_shapes,
                          True, bound)
    if every_shape:
        shapes = list(all_shapes(counts, tps, n_layers))
        partitioner.solve_many(map(builder.keys, shapes))  # every DP at once, then read off
        outlines = [t for t in map(builder.outline, shapes) if t]
    else:
        singles = [(Block(k, tp, c),) for k in counts
                   for tp, c in block_options(counts[k], tps[k], n_layers)]
        order = {k: (-cluster.kinds[k].memory_gib,
                     -cluster.kinds[k].peak_flops(partitioner.dtypes[k])) for k in counts}
        orders = kind_orders(sorted(counts, key=order.get))
        combos = {} if combos is None else combos
        bounded = smaller is not None and np.isfinite(beat_s)
        if bounded:
            # before any partition of this size: every shape it would take, on lower bounds
            low = builder.bounded(ScaledSlots(partitioners[smaller], partitioner, tps))
            singles_low = [t for t in map(low.outline, singles) if t is not None]
            low_tps = _efficient_tps(singles_low, tps, micro_batches,
                                     options.mixed_tp_per_kind)
            mixed_low = {s: low.outline(s) for s in _mixed_shapes(
                low, counts, low_tps, orders, dict(combos), micro_batch_size, False)}
            if _beyond_reach(singles_low, mixed_low.values(), cluster, micro_batches, beat_s):
                return Candidates(micro_batch_size, micro_batches, [], {}, max_shapes, False,
                                  np.inf)
        partitioner.solve_many(map(builder.keys, singles))
        outlines = [t for t in map(builder.outline, singles) if t is not None]
        best_tps = _efficient_tps(outlines, tps, micro_batches, options.mixed_tp_per_kind)
        mixed = _mixed_shapes(builder, counts, best_tps, orders, combos, micro_batch_size, True)
        # again with the single shapes exact, before the mixed ones are partitioned
        if bounded and _beyond_reach(outlines, (mixed_low[s] if s in mixed_low
                                                 else low.outline(s) for s in mixed),
                                     cluster, micro_batches, beat_s):
            return Candidates(micro_batch_size, micro_batches, [], {}, max_shapes, False,
                              np.inf)
        partitioners[micro_batch_size] = partitioner  # its partitions are computed below
        partitioner.solve_many(map(builder.keys, mixed))  # every DP at once, then read off
        outlines += [t for t in map(builder.outline, mixed) if t is not None]
    capacity = capacities(outlines, cluster)
    if not outlines or not CoverLP(outlines, capacity, micro_batches).covers(beat_s):
        return Candidates(micro_batch_size, micro_batches, [], {}, max_shapes, False, np.inf)
    screen = screen_templates(outlines, capacity, micro_batches, options.screen_keep)
    templates = [builder.complete(outlines[i]) for i in screen.keep]
    return Candidates(micro_batch_size, micro_batches, templates,
                      capacities(templates, cluster), max_shapes, False, screen.bound_s)


def _template_builder(cluster: Cluster, cost: CostModel, tables: TableCache,
                      options: SearchOptions, micro_batch_size: int, micro_batches: int,
                      max_shapes: int, optimizer_shards: int) -> TemplateBuilder:
    """The builder of one micro-batch size's templates, with its partitioner over `tables`
    (`builder.partitioner`): each kind in its dtype, the cluster's links."""
    dtypes = kind_dtypes(cluster, list(plan_kinds(cluster, options)), options.dtype)
    links = LinkModel(cluster)
    partitioner = Partitioner(tables, dtypes, micro_batch_size,
                              BoundaryComm(cost, links, dtypes, micro_batch_size),
                              options.allow_recompute, optimizer_shards)
    return TemplateBuilder(cost, partitioner, links, micro_batches, max_shapes,
                           options.schedule, tuple(options.in_flight_scales),
                           options.sharded_optimizer)


def _beyond_reach(singles: list[Template], mixed: Iterable[Template | None], cluster: Cluster,
                  micro_batches: int, beat_s: float) -> bool:
    outlines = singles + [t for t in mixed if t is not None]
    return beyond_reach(outlines, capacities(outlines, cluster), micro_batches, beat_s)


def _mixed_shapes(builder: TemplateBuilder, counts: dict[str, int],
                  tps: dict[str, list[int]], orders: list[tuple[str, ...]],
                  combos: dict[frozenset[tuple[str, int]], float], micro_batch_size: int,
                  solve: bool) -> list[Shape]:
    """The mixed shapes of one size: proportional shapes of every tp combination (of `tps`)
    in the first kind order, and of the best OTHER_ORDER_COMBINATIONS by `combos` in the
    others. Combinations not ranked yet are ranked by the builder's outlines of their
    first-order shapes, into `combos` (partitioned first when `solve`)."""
    n_layers = builder.spec.n_layers
    ranked = [c for c in sorted(combos, key=combos.get, reverse=True)
              if all(tp in tps[k] for k, tp in c)]
    if not ranked:  # none ranked yet at these tp sizes: rank them here
        first = [s for s in proportional_shapes(counts, tps, n_layers, orders[:1])
                 if len(s) == len(counts)]
        if solve:
            builder.partitioner.solve_many(map(builder.keys, first))
        ranking = _rank_combinations([t for t in map(builder.outline, first) if t],
                                     micro_batch_size)
        combos.update(ranking)
        ranked = sorted(ranking, key=ranking.get, reverse=True)
    top = set(ranked[:OTHER_ORDER_COMBINATIONS])
    return list(proportional_shapes(counts, tps, n_layers, orders, top))


def _rank_combinations(outlines: list[Template], micro_batch_size: int
                       ) -> dict[frozenset[tuple[str, int]], float]:
    """Per tp combination, the most samples per second a shape of it gives the cluster
    (every copy it allows, a micro-batch per slot each)."""
    out: dict[frozenset[tuple[str, int]], float] = {}
    for t in outlines:
        key = tp_combination(t.blocks)
        out[key] = max(out.get(key, 0.0), t.n_max * micro_batch_size / t.slot_s)
    return out


def _efficient_tps(singles: list[Template], tps: dict[str, list[int]], micro_batches: int,
                   keep: int) -> dict[str, list[int]]:
    """Per kind, the tp sizes with which its devices alone finish the batch soonest (every
    copy of a single-kind template, micro-batches split evenly, bubbles included)."""
    best: dict[tuple[str, int], float] = {}
    for t in singles:
        (block,) = t.blocks
        finish = t.route_s(math.ceil(micro_batches / t.n_max))
        key = (block.kind, block.tp)
        best[key] = min(best.get(key, np.inf), finish)
    out = {}
    for kind, options in tps.items():
        ranked = sorted((tp for tp in options if (kind, tp) in best),
                        key=lambda tp: best[(kind, tp)])
        out[kind] = ranked[:keep] or options[:1]
    return out


@cyclic_gc_paused()
def search_plan(cluster: Cluster, cost: CostModel, global_batch: int,
                options: SearchOptions | None = None) -> SearchResult:
    """The fastest plan the search finds; PlannerError with the reason when none fits."""
    options = options or SearchOptions()
    start = time.perf_counter()
    tables = TableCache(cost)
    shard_options = options.optimizer_shards if options.sharded_optimizer else (1,)
    priced: list[tuple[StepEstimate, Plan, CountSolution, Candidates]] = []
    exhaustive, built = True, 0
    chosen: tuple[CountSolution, Candidates] | None = None  # the closed forms' best, priced
    # Largest shard assumption first: a partition given more memory is never slower, so once
    # a plan of it fits, smaller assumptions are not searched.
    for shards in sorted(set(shard_options) | {1}, reverse=True):
        if priced:
            break
        best: tuple[CountSolution, Candidates] | None = None
        solved: list[tuple[CountSolution, Candidates]] = []
        partitioners: dict[int, Partitioner] = {}
        combos: dict[frozenset[tuple[str, int]], float] = {}
        for mbs in options.micro_batch_sizes:
            if global_batch % mbs:
                continue
            beat_s = np.inf if best is None else best[0].step_s
            cands = build_candidates(cluster, cost, tables, global_batch, mbs, options, beat_s,
                                     shards, partitioners, combos)
            built += len(cands.templates)
            exhaustive &= cands.exhaustive
            if cands.pipeline_bound_s >= beat_s:
                continue
            sol = choose_counts(cands.templates, cands.micro_batches, cands.capacity,
                                cands.max_shapes, cands.pipeline_bound_s,
                                None if cands.exhaustive else options.program_budget)
            if sol is not None:
                solved.append((sol, cands))
                if best is None or sol.step_s < best[0].step_s:
                    best = (sol, cands)
        if best is not None:
            chosen = best
            found, bar_s = _priced(cluster, cost, global_batch, options, *best, shards)
            priced += found
            priced += _priced_slotted(cluster, cost, global_batch, options, *best, shards,
                                      bar_s)
            priced += _in_halves(cluster, cost, global_batch, options, *best, shards)
            # another micro-batch size whose answer the closed forms put close behind, and a
            # run of its copies finds faster
            for other in solved:
                if (other is not best and other[0].step_s <= best[0].step_s * (1 + SIZE_TIE)
                        and _rerun_s(*other, cost.spec.name, options.schedule)
                        < _rerun_s(*best, cost.spec.name, options.schedule)):
                    priced += _priced_choice(cluster, cost, global_batch, options, *other,
                                             shards)
    if not priced or chosen is None:
        raise PlannerError(explain_infeasible(cluster, cost, global_batch, options))
    # the best plan of each unit (whole layers, half layers), each tried in sequence pieces
    answers: dict[bool, tuple[StepEstimate, Plan]] = {}
    for est, plan, _, _ in sorted(priced, key=lambda x: x[0].step_s):
        answers.setdefault(plan.half_layers, (est, plan))
    spent, tried = 0, []
    for est, plan in sorted(answers.values(), key=lambda x: x[0].step_s):
        est, plan, spent = _in_pieces(cluster, cost, est, plan, options.seq_chunks, spent)
        tried.append((est, plan))
    est, plan = min(tried, key=lambda x: x[0].step_s)
    search_s = time.perf_counter() - start
    plan = plan.model_copy(update={"predicted": est.predicted()})
    return SearchResult(plan=plan, estimate=est, search_s=search_s, exhaustive=exhaustive,
                        templates_built=built, candidates=chosen[1], solution=chosen[0])


def _in_halves(cluster: Cluster, cost: CostModel, global_batch: int, options: SearchOptions,
               sol: CountSolution, cands: Candidates, shards: int
               ) -> list[tuple[StepEstimate, Plan, CountSolution, Candidates]]:
    """The answer's micro-batch size again in half layers (Plan.half_layers), where the
    model's runtime cuts its blocks so. A stage boundary between a block's halves balances
    stages whose kinds do a whole layer in a large share of the slot (mixed-1280: MLU370
    stages of 2 layers at 136 ms beside 157 ms ones, 16.61 -> 16.07 s a step).

    The shapes are those screening keeps of the answer's candidates, and the answer's own
    (a search over half layers from the start takes twice the time), partitioned over half
    layers. Where some shape's slowest stage gains HALF_LAYER_GAIN, the answer's shapes and
    the best others by their slots (HALF_LAYER_TEMPLATES in all) are completed (a run of a
    copy through the shared schedule each), the counts chosen again, and the plan priced
    where the closed forms see a gain. Scaling the whole-layer templates' cycles by the
    slots instead of completing missed the gain on 1 of 3 clusters and priced 2 for none."""
    if not options.half_layers or cost.spec.halves is None or not cands.templates:
        return []
    halves = cost.units(True)
    keep = screen_templates(cands.templates, cands.capacity, cands.micro_batches,
                            options.screen_keep).keep
    wholes = [cands.templates[i]
              for i in dict.fromkeys([*keep, *(c.template for c in sol.choices)])]
    mbs = cands.micro_batch_size
    builder = _template_builder(cluster, halves, TableCache(halves), options, mbs,
                                cands.micro_batches, cands.max_shapes, shards)
    builder.partitioner.solve_many(builder.keys(t.blocks) for t in wholes)
    whole_slot = {t.blocks: t.partition.slot_s for t in wholes if t.partition is not None}
    outlines = [t for t in (builder.outline(w.blocks) for w in wholes) if t is not None]
    if not any(t.slot_s * (1 + HALF_LAYER_GAIN) <= whole_slot.get(t.blocks, 0.0)
               for t in outlines):
        return []
    answer = {cands.templates[c.template].blocks for c in sol.choices}
    ranked = sorted(outlines, key=lambda t: (t.blocks not in answer,
                                             -t.n_max * mbs / t.slot_s))
    templates = [builder.complete(t) for t in ranked[:HALF_LAYER_TEMPLATES]]
    capacity = capacities(templates, cluster)
    found = choose_counts(templates, cands.micro_batches, capacity, cands.max_shapes, 0.0,
                          None if cands.exhaustive else options.program_budget)
    if found is None or found.step_s >= sol.step_s:
        return []  # the closed forms see no gain: nothing to price
    cut = replace(cands, templates=templates, capacity=capacity, runs={})
    # under the options' schedule only (also pricing 1F1B where a run says it comes close
    # took a 252-chip cluster's step over half layers from 0.70 to 1.35 s, for no gain)
    return _priced_choice(cluster, halves, global_batch, options, found, cut, shards,
                          kinds=(options.schedule,))


def _in_pieces(cluster: Cluster, cost: CostModel, est: StepEstimate, plan: Plan,
               seq_chunks: Iterable[int], spent: int = 0) -> tuple[StepEstimate, Plan, int]:
    """The answer with each micro-batch cut into sequence pieces (Plan.seq_chunks): its
    pipelines fill and drain in steps that much shorter, at the same activation memory
    (pieces are counted against the same limits). The most pieces first, then fewer: the
    first count whose run of the shared schedule is faster than whole sequences and whose
    plan is valid and within memory (each piece reads every weight again and pays each
    transfer's latency: short pieces lose where those bound the compute). Counts whose runs
    would take the runs priced so far (`spent` units before, returned with the plan) past
    PIECES_UNITS are left out (their time grows with the pieces' actions: long runs of deep
    pipelines stay whole to keep the search within its time)."""
    units = _run_units(plan)
    for chunks in sorted(set(seq_chunks) - {1}, reverse=True):
        if spent + units * chunks > PIECES_UNITS:
            continue
        try:
            trial = Plan.model_validate({**plan.model_dump(), "seq_chunks": chunks})
            validate_plan(trial, cluster, cost.spec)
        except (ValueError, PlanError):
            continue
        spent += units * chunks
        trial_est = estimate_step(trial, cost)
        if trial_est.step_s >= est.step_s:
            continue
        try:
            check_memory(trial, cluster, plan_memory_fn(trial, cost), trial_est.peak_in_flight)
        except PlanError:
            continue
        return trial_est, trial, spent
    return est, plan, spent


def _run_units(plan: Plan) -> int:
    """Micro-batches x stages of the routes the shared schedule's priced run goes through:
    one of each shape and micro-batch count (estimate.schedule_times runs one copy each)."""
    classes = {(route_signature(plan, r), r.micro_batches, r.micro_batch_size): len(r.stages)
               * r.micro_batches for r in plan.routes}
    return sum(classes.values())


def _priced(cluster: Cluster, cost: CostModel, global_batch: int, options: SearchOptions,
            sol: CountSolution, cands: Candidates, shards: int
            ) -> tuple[list[tuple[StepEstimate, Plan, CountSolution, Candidates]], float]:
    """The templates' closed forms chose; the shared schedule and sync definition price. The
    best single-shape plans are priced too (_best_single_shapes). Partitions that assumed a
    sharded optimizer's memory count only where the placed plan fits. Also returns the best
    run of the copies of a single shape priced (a bar for _priced_slotted)."""
    singles = _best_single_shapes(cands, cost.spec.name, options.schedule)
    # a single shape is priced when a run of its copy beats the answer's own run
    answer_s = _rerun_s(sol, cands, cost.spec.name, options.schedule)
    beat = answer_s * (1 + NEAR_TIE)
    chosen = [(choice, kind, rerun) for choice, kind, rerun in singles
              if rerun <= beat and not (choice.choices == sol.choices
                                        and kind == options.schedule)]
    # A single-shape answer is one more single shape: where NEAR_TIES others' runs beat its
    # own, it would not have been listed among them, and is priced only if none of them fits.
    outranked = (len(sol.choices) == 1 and len(chosen) == NEAR_TIES
                 and all(rerun < answer_s for _, _, rerun in chosen))
    # Where transfers dominate, split backwards can lose to 1F1B (a weight gradient started
    # just before an input gradient arrives delays it): the chosen counts are priced under
    # 1F1B too where a run of their copies says it may win, and a single shape ranked under
    # 1F1B under 1F1B only.
    out = [] if outranked else _priced_choice(cluster, cost, global_batch, options, sol,
                                              cands, shards)
    for choice, kind, _ in chosen:
        out += _priced_choice(cluster, cost, global_batch, options, choice, cands, shards,
                              kinds=(kind,), answer=sol)
    if outranked and not out:
        out = _priced_choice(cluster, cost, global_batch, options, sol, cands, shards)
    # the bar: runs of single shapes' copies (a mix's is its slowest shape's, and misleads)
    single = len(sol.choices) == 1 and not outranked
    return out, min([rerun for _, _, rerun in chosen] + ([answer_s] if single else []),
                    default=math.inf)


def _priced_slotted(cluster: Cluster, cost: CostModel, global_batch: int,
                    options: SearchOptions, sol: CountSolution, cands: Candidates, shards: int,
                    bar_s: float = math.inf
                    ) -> list[tuple[StepEstimate, Plan, CountSolution, Candidates]]:
    """The count program again with each template's cycle at least its slowest stage's slot
    (waits not hidden under compute), and its answer priced when it differs: where
    transfers are a large part of a slot (small models, slow links), a copy's short run
    hides them better than many copies' schedules do, and the measured cycles favour single
    long shapes over mixes (cpu-and-emulated + tiny at sequence 16: 347 -> 356 us without
    this). A single shape is priced only where a run of its copies beats `bar_s` (the best
    run of a single shape's copies priced before): the single shapes are ranked by those
    runs already, and it is one more near tie (a mix's run, its slowest shape's, is what
    misleads here)."""
    slotted = [replace(t, slot_s=max(t.slot_s, t.partition.slot_s))
               if t.partition is not None else t for t in cands.templates]
    alt = choose_counts(slotted, cands.micro_batches, cands.capacity, cands.max_shapes,
                        cands.pipeline_bound_s,
                        None if cands.exhaustive else options.program_budget)
    if alt is None or alt.choices == sol.choices or (
            len(alt.choices) == 1
            and _rerun_s(alt, cands, cost.spec.name, options.schedule) >= bar_s):
        return []
    return _priced_choice(cluster, cost, global_batch, options, alt, cands, shards)


def _rerun_s(sol: CountSolution, cands: Candidates, model: str, schedule: ScheduleKind
             ) -> float:
    """A count solution's step with each chosen shape's copy run at its micro-batches
    (templates.run_route_s) instead of its closed form, and the closed-form tail."""
    return sol.tail_s + max(
        cands.run_s(c.template, model, schedule, math.ceil(c.micro_batches / c.copies))
        for c in sol.choices)


def _priced_choice(cluster: Cluster, cost: CostModel, global_batch: int,
                   options: SearchOptions, sol: CountSolution, cands: Candidates, shards: int,
                   kinds: tuple[ScheduleKind, ...] = ("zero_bubble", "1f1b"),
                   answer: CountSolution | None = None
                   ) -> list[tuple[StepEstimate, Plan, CountSolution, Candidates]]:
    """One count solution placed and priced, under the options' schedule and 1F1B (of
    `kinds`; 1F1B beside zero-bubble only where a run of its copies comes within
    RERUN_1F1B_TIE), each kept where it fits; `answer` is the solution it is listed with."""
    placed = place_plan(cluster, cost.spec, cands.templates, sol.choices,
                        cands.micro_batch_size, global_batch, options)
    plans = [placed] if placed.schedule in kinds else []
    if placed.schedule != "1f1b" and "1f1b" in kinds and (
            placed.schedule not in kinds
            or _rerun_s(sol, cands, cost.spec.name, "1f1b")
            <= _rerun_s(sol, cands, cost.spec.name, placed.schedule) * (1 + RERUN_1F1B_TIE)):
        plans.append(_as_1f1b(placed))
    out = []
    for plan in plans:
        try:  # partitions that assumed a sharded optimizer's memory: stopped once over it
            est = estimate_step(plan, cost, None if shards == 1 else _most_held(plan, cost))
        except HeldOver:
            continue
        out.append((est, plan, answer or sol, cands))
    return out


def _best_single_shapes(cands: Candidates, model: str, schedule: ScheduleKind
                        ) -> list[tuple[CountSolution, ScheduleKind, float]]:
    """The best single-shape plans, each with the schedule kind to run it under and its step
    by that run: those within RERUN_WITHIN of the best closed form (at most RERUN_MOST) and,
    under zero-bubble, the best RERUN_1F1B by 1F1B's closed form (S - 1 + m slots of the
    partition: where split backwards lose, on long pipelines of small TP groups, it ranks
    shapes the zero-bubble forms leave out), ranked by a run of one copy at their
    micro-batches (and their closed-form tails): the best of them first, then those within
    NEAR_TIE of it."""
    entries = [(sol, schedule) for sol in best_singles(cands.templates, cands.micro_batches,
                                                        RERUN_WITHIN, RERUN_MOST)]
    if schedule != "1f1b":
        entries += [(sol, "1f1b") for sol in _best_1f1b_singles(cands)]
    ranked = [(_rerun_s(sol, cands, model, kind), k, sol, kind)
              for k, (sol, kind) in enumerate(entries)]
    if not ranked:
        return []
    ranked.sort(key=lambda r: r[:2])
    return [(sol, kind, step) for step, _, sol, kind in ranked
            if step <= ranked[0][0] * (1 + NEAR_TIE)][:NEAR_TIES]


def _best_1f1b_singles(cands: Candidates) -> list[CountSolution]:
    """Per complete template its best copies by 1F1B's closed form, the best RERUN_1F1B."""
    best = []
    for t, tpl in enumerate(cands.templates):
        if tpl.partition is None or tpl.tail_s is None:
            continue
        slot, fill = tpl.partition.slot_s, (tpl.n_stages - 1) * tpl.partition.slot_s
        top = None
        for n in range(1, min(tpl.n_max, cands.micro_batches) + 1):
            step = fill + math.ceil(cands.micro_batches / n) * slot + float(tpl.tail_s[n - 1, 0])
            if top is None or step < top[0]:
                top = (step, n)
        if top is not None:
            best.append((top[0], t, top[1]))
    best.sort()
    return [evaluate(cands.templates, (Choice(t, n, cands.micro_batches),))
            for _, t, n in best[:RERUN_1F1B]]


def _as_1f1b(plan: Plan) -> Plan:
    return Plan(model=plan.model, seq_len=plan.seq_len, global_batch=plan.global_batch,
                stage_groups=[g.model_copy(update={"in_flight_scale": 1.0})
                              for g in plan.stage_groups],
                routes=plan.routes, schedule="1f1b", sharded_optimizer=plan.sharded_optimizer,
                half_layers=plan.half_layers)


def _most_held(plan: Plan, cost: CostModel) -> dict[str, int]:
    """Per group, the most micro-batches in flight with which a device of it holds its
    stage (its optimizer share under a sharded optimizer included); -1 where its states
    alone do not fit. Memory never shrinks with more in flight: a bisection per group."""
    memory = plan_memory_fn(plan, cost)
    out = {}
    for g in plan.stage_groups:
        cap = cost.cluster.kinds[g.kind].memory_bytes * (1 - MEMORY_SLACK)
        lo, hi = -1, plan.micro_batches_of(g.name)  # memory(lo) fits (-1: vacuously)
        if memory(g, hi) <= cap:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if memory(g, mid) <= cap else (lo, mid)
        out[g.name] = lo
    return out

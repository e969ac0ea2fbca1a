"""The shared schedule: runs of linked route sets, copies renamed, runs stopped on memory."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.plan import Plan, build_schedule
from hetrain.plan import schedule as sched

SEQ_LEN = 64


def _cluster():
    return cluster_from_dict({
        "name": "two-kinds",
        "nodes": [{"name": "h", "kind": "H100", "count": 8, "replicas": 2},
                  {"name": "a", "kind": "A100-80GB", "count": 8, "replicas": 2}],
        "links": {"inter_node_gbps": 25, "bridge_gbps": 20, "inter_node_latency_us": 10},
    })


def _plan(schedule: str) -> Plan:
    """Two copies of one pipeline (same node pair), a third on other nodes with more
    micro-batches, and two routes sharing a first stage."""
    def group(name, kind, device, layers):
        return {"name": name, "kind": kind, "devices": [device], "layers": layers,
                "in_flight_scale": 1.5 if schedule == "zero_bubble" else 1.0}

    groups = [group("c0a", "H100", "h-0:0", [0, 5]), group("c0b", "A100-80GB", "a-0:0", [5, 10]),
              group("c1a", "H100", "h-0:1", [0, 5]), group("c1b", "A100-80GB", "a-0:1", [5, 10]),
              group("c2a", "H100", "h-1:0", [0, 5]), group("c2b", "A100-80GB", "a-1:0", [5, 10]),
              group("s", "H100", "h-1:1", [0, 4]), group("s1", "A100-80GB", "a-1:1", [4, 10]),
              group("s2", "A100-80GB", "a-1:2", [4, 10])]
    routes = [{"stages": ["c0a", "c0b"], "micro_batches": 5, "micro_batch_size": 2},
              {"stages": ["c1a", "c1b"], "micro_batches": 5, "micro_batch_size": 2},
              {"stages": ["c2a", "c2b"], "micro_batches": 7, "micro_batch_size": 2},
              {"stages": ["s", "s1"], "micro_batches": 4, "micro_batch_size": 1},
              {"stages": ["s", "s2"], "micro_batches": 3, "micro_batch_size": 1}]
    return Plan.model_validate({"model": "small", "seq_len": SEQ_LEN, "global_batch": 41,
                                "stage_groups": groups, "routes": routes,
                                "schedule": schedule})


def _one_run(plan: Plan, cost) -> sched.Schedule:
    """The whole plan as one run (what build_schedule gave before it split the routes)."""
    transfer = sched.transfer_times(plan, cost)
    return sched._listed(plan, sched._ListScheduler(plan, cost, transfer))


def _renamed_sets(monkeypatch) -> list[list[int]]:
    """Filled with the route sets that take another set's run under their own names."""
    renamed: list[list[int]] = []
    original = sched._renamed
    monkeypatch.setattr(sched, "_renamed", lambda *a: renamed.append(a[2]) or original(*a))
    return renamed


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_runs_of_route_sets_and_renamed_copies_equal_one_run(schedule, chunks, monkeypatch):
    cluster = _cluster()
    plan = _plan(schedule).model_copy(update={"seq_chunks": chunks})
    cost = CostModel(cluster, model_spec(model_config("small"), SEQ_LEN))
    renamed = _renamed_sets(monkeypatch)
    got, want = build_schedule(plan, cost), _one_run(plan, cost)
    assert renamed == [[1]]  # the second copy took the first one's run; the rest ran
    assert got.actions == want.actions
    assert list(got.actions) == [g.name for g in plan.stage_groups]
    assert got.start_s == want.start_s and got.end_s == want.end_s
    assert got.peak_in_flight == want.peak_in_flight
    assert got.comm_wait_s == want.comm_wait_s
    assert got.estimated_step_s == want.estimated_step_s


def test_a_copy_on_other_links_runs_on_its_own(monkeypatch):
    """Copies whose transfers take other times are not renamed: their timing differs."""
    cluster = _cluster()
    plan = _plan("zero_bubble")
    slow = {("h-0:1", "a-0:1"), ("a-0:1", "h-0:1")}

    class SlowerLink(CostModel):
        def p2p_s(self, src, dst, nbytes):
            return super().p2p_s(src, dst, nbytes) * (3.0 if (src, dst) in slow else 1.0)

    cost = SlowerLink(cluster, model_spec(model_config("small"), SEQ_LEN))
    renamed = _renamed_sets(monkeypatch)
    got, want = build_schedule(plan, cost), _one_run(plan, cost)
    assert renamed == []
    assert got.start_s == want.start_s and got.actions == want.actions


def test_a_run_stops_once_a_group_holds_more_than_its_memory():
    cluster = _cluster()
    plan = _plan("zero_bubble")
    cost = CostModel(cluster, model_spec(model_config("small"), SEQ_LEN))
    full = build_schedule(plan, cost)
    enough = dict(full.peak_in_flight)
    within = sched.schedule_within(plan, cost, enough)
    assert within is not None
    assert within.actions == full.actions and within.start_s == full.start_s
    for group, peak in full.peak_in_flight.items():
        assert sched.schedule_within(plan, cost, {**enough, group: peak - 1}) is None


@settings(max_examples=40, deadline=None)
@given(copies=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 6), st.sampled_from([1, 2]),
                                 st.booleans()), min_size=1, max_size=4),
       schedule=st.sampled_from(["1f1b", "zero_bubble"]))
def test_any_plan_schedules_as_one_run(copies, schedule):
    """Pipelines of one or two stages (node pair 0 or 1: equal copies or not), some micro-
    batches of some size each, optionally a second route through the same first stage: the
    schedule equals one run of the whole plan."""
    cluster = _cluster()
    cost = CostModel(cluster, model_spec(model_config("small"), SEQ_LEN))
    groups, routes, batch = [], [], 0
    for i, (pair, micro_batches, size, shared) in enumerate(copies):
        first = {"name": f"p{i}a", "kind": "H100", "devices": [f"h-{pair - 1}:{i}"],
                 "layers": [0, 5]}
        ends = [{"name": f"p{i}b{j}", "kind": "A100-80GB", "devices": [f"a-{pair - 1}:{2 * i + j}"],
                 "layers": [5, 10]} for j in range(1 + shared)]
        groups += [first] + ends
        for end in ends:
            routes.append({"stages": [first["name"], end["name"]], "micro_batches": micro_batches,
                           "micro_batch_size": size})
            batch += micro_batches * size
    plan = Plan.model_validate({"model": "small", "seq_len": SEQ_LEN, "global_batch": batch,
                                "stage_groups": groups, "routes": routes,
                                "schedule": schedule})
    got, want = build_schedule(plan, cost), _one_run(plan, cost)
    assert got.actions == want.actions
    assert got.start_s == want.start_s and got.end_s == want.end_s
    assert got.peak_in_flight == want.peak_in_flight and got.comm_wait_s == want.comm_wait_s
    assert got.estimated_step_s == want.estimated_step_s
    _chain_holds(got, sched.critical_path(got))


def _chain_holds(schedule: sched.Schedule, segments: list[sched.PathSegment]) -> None:
    """The segments are a chain of dependencies through the schedule that adds up to its
    makespan: each starts its wait after the previous one ends, runs its group's consecutive
    actions back to back, and (after the first) its first action takes its input from the
    previous segment's group or follows that group's previous action."""
    assert segments[0].start_s == pytest.approx(segments[0].wait_s)
    assert segments[-1].end_s == pytest.approx(schedule.estimated_step_s)
    for prev, seg in itertools.pairwise(segments):
        assert seg.start_s == pytest.approx(prev.end_s + seg.wait_s)
    for seg in segments:
        starts = {t: i for (g, i), t in schedule.start_s.items() if g == seg.group}
        first = starts[seg.start_s]
        acts = schedule.actions[seg.group]
        assert acts[first].label == seg.first
        for i in range(first + 1, first + seg.actions):
            assert schedule.start_s[(seg.group, i)] == pytest.approx(
                schedule.end_s[(seg.group, i - 1)])
        assert schedule.end_s[(seg.group, first + seg.actions - 1)] == seg.end_s
    for prev, seg in itertools.pairwise(segments):
        first = next(i for (g, i), t in schedule.start_s.items()
                     if g == seg.group and t == seg.start_s)
        assert schedule.actions[seg.group][first].recv_from == prev.group


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_the_critical_path_runs_through_the_slowest_stage(schedule):
    """Three stages, the middle one with three times the layers: after the fill (the first
    micro-batch reaching it, and under 1F1B its first gradient coming back) it computes back
    to back until its last forward or backward, and the drain follows the last micro-batch
    out and back."""
    groups = [{"name": n, "kind": "H100", "devices": [f"h-0:{i}"], "layers": layers}
              for i, (n, layers) in enumerate([("a", [0, 1]), ("b", [1, 4]), ("c", [4, 5])])]
    plan = Plan.model_validate({"model": "small", "seq_len": SEQ_LEN, "global_batch": 8,
                                "stage_groups": groups, "schedule": schedule,
                                "routes": [{"stages": ["a", "b", "c"], "micro_batches": 8,
                                            "micro_batch_size": 1}]})
    built = build_schedule(plan)  # unit durations: a forward is a layer's 1, a backward 2
    segments = sched.critical_path(built)
    _chain_holds(built, segments)
    summary = sched.critical_path_summary(plan, built)
    assert summary["bottleneck"]["group"] == "b"
    assert summary["fill_s"] + summary["bottleneck"]["busy_s"] + summary["drain_s"] == \
        pytest.approx(built.estimated_step_s)
    # b computes 8 x (3 + 6) = 72 units; all but its first forwards (before a gradient came
    # back, under 1F1B) and its last backward lie on the path
    assert summary["bottleneck"]["busy_s"] >= 72 - 3 * 3 - 6
    assert summary["bottleneck"]["kind"] == "H100" and summary["bottleneck"]["layers"] == [1, 4]


def _unit_pipeline(layers: list[int], micro_batches: int, schedule: str,
                   scale: float = 1.0, chunks: int = 1) -> Plan:
    """One route, stage i holding layers[i] layers (unit durations: build_schedule without a
    cost model), each micro-batch in `chunks` sequence pieces."""
    bounds = list(itertools.accumulate([0, *layers]))
    groups = [{"name": f"s{i}", "kind": "K", "devices": [f"d{i}"], "layers": [a, b],
               "in_flight_scale": scale} for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    return Plan.model_validate({
        "model": "x", "seq_len": chunks, "global_batch": micro_batches, "stage_groups": groups,
        "routes": [{"stages": [g["name"] for g in groups], "micro_batches": micro_batches,
                    "micro_batch_size": 1}], "schedule": schedule, "seq_chunks": chunks})


@settings(max_examples=30, deadline=None)
@given(layers=st.lists(st.integers(1, 5), min_size=2, max_size=10),
       micro_batches=st.integers(1, 40), scale=st.sampled_from([1.0, 1.5, 1.75]))
def test_zero_bubble_holds_at_most_its_limit_plus_its_cap(layers, micro_batches, scale):
    """A weight gradient waits only while the group holds fewer micro-batches than its
    in-flight limit plus its cap: at scale 1 (no cap) no group holds more than 1F1B's
    in-flight limit."""
    plan = _unit_pipeline(layers, micro_batches, "zero_bubble", scale)
    schedule = build_schedule(plan)
    for g in plan.stage_groups:
        bound = sched.in_flight_limit(plan, g.name) + sched.weight_grad_cap(plan, g.name)
        assert schedule.peak_in_flight[g.name] <= min(bound, micro_batches)
        if scale == 1.0:  # no cap: the limit 1F1B holds to
            assert sched.weight_grad_cap(plan, g.name) == 0


def test_weight_gradients_wait_for_forwards_behind_a_slower_middle():
    """Fifteen stages, the middle four a third slower (six-2048's shape: H100 stages at
    their memory mid-pipeline): at 1F1B's memory, weight gradients run after the forwards
    the later stages wait for. A weight gradient run at once after its input gradient left
    the step 16 % over the busiest stage's compute; deferred, it is under 10 %."""
    layers = [3] * 5 + [4] * 4 + [3] * 6
    plan = _unit_pipeline(layers, 64, "zero_bubble")
    schedule = build_schedule(plan)
    busiest = 3 * max(layers) * 64  # forward, input and weight gradient: one unit a layer each
    assert schedule.estimated_step_s < 1.10 * busiest
    assert schedule.estimated_step_s < build_schedule(
        _unit_pipeline(layers, 64, "1f1b")).estimated_step_s


@settings(max_examples=40, deadline=None)
@given(layers=st.lists(st.integers(1, 4), min_size=1, max_size=8),
       micro_batches=st.integers(1, 12), chunks=st.integers(2, 4),
       schedule=st.sampled_from(["1f1b", "zero_bubble"]), scale=st.sampled_from([1.0, 1.5]))
def test_sequence_pieces_run_in_order_within_their_memory(layers, micro_batches, chunks,
                                                          schedule, scale):
    """Every group runs each piece's forward after the previous piece's, its backward after
    its forward and after the next piece's backward (the gradients of the keys and values
    that piece read), each once; and holds at most its limit plus its cap in pieces: the
    micro-batches' worth whole sequences hold."""
    plan = _unit_pipeline(layers, micro_batches, schedule, scale, chunks)
    whole = _unit_pipeline(layers, micro_batches, schedule, scale)
    built = build_schedule(plan)
    for g in plan.stage_groups:
        forwards, backwards, weights = set(), set(), set()
        for a in built.actions[g.name]:
            piece = (a.micro_batch, a.chunk)
            if a.op == "forward":
                assert a.chunk == 0 or (a.micro_batch, a.chunk - 1) in forwards
                forwards.add(piece)
            elif a.op == "backward_weight":
                assert piece in backwards
                weights.add(piece)
            else:
                assert piece in forwards
                assert a.chunk == chunks - 1 or (a.micro_batch, a.chunk + 1) in backwards
                backwards.add(piece)
        every = {(m, c) for m in range(micro_batches) for c in range(chunks)}
        assert forwards == backwards == every
        assert weights in (every, set())
        limit = sched.in_flight_limit(plan, g.name) + sched.weight_grad_cap(plan, g.name)
        assert limit == chunks * (sched.in_flight_limit(whole, g.name)
                                  + sched.weight_grad_cap(whole, g.name))
        assert built.peak_in_flight[g.name] <= limit


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_sequence_pieces_shorten_fill_and_drain(chunks):
    """Four equal stages, 8 micro-batches under 1F1B: the step is each stage's compute plus
    the fill and drain, S - 1 forward-and-backward slots of one piece: (m c + S - 1) slots
    of 1/c of a micro-batch's."""
    plan = _unit_pipeline([2] * 4, 8, "1f1b", chunks=chunks)
    busy = 8 * 2 * 3  # per stage: micro-batches x layers x (forward 1 + backward 2)
    assert build_schedule(plan).estimated_step_s == pytest.approx(busy + 3 * 6 / chunks)
    assert build_schedule(_unit_pipeline([2] * 4, 8, "zero_bubble", chunks=chunks)
                          ).estimated_step_s < busy + 3 * 6 / chunks

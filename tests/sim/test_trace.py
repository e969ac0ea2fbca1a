"""Traces are valid Chrome trace JSON, round-trip, and label emulated runs."""

from __future__ import annotations

import json

import pytest

from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.sim import simulate_plan
from hetrain.trace import (
    CATEGORIES,
    TraceError,
    TraceEvent,
    load_chrome_trace,
    write_chrome_trace,
)

from .helpers import SEQ_LEN, line_cluster, pipeline_plan


@pytest.fixture
def simulated():
    cluster = line_cluster(3, per_node=2, latency_us=10)
    plan = pipeline_plan(cluster, 3, 4, pipelines=2)
    cost = CostModel(cluster, model_spec(model_config("tiny"), SEQ_LEN))
    return simulate_plan(plan, cluster, cost)


def test_simulated_trace_is_valid_chrome_json(simulated, tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(simulated.events, path, {"source": "simulator"})
    raw = json.load(path.open())
    assert raw["displayTimeUnit"] == "ms"
    assert raw["otherData"]["source"] == "simulator"
    complete = [e for e in raw["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(simulated.events)
    for e in complete:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys()
        assert e["ts"] >= 0 and e["dur"] >= 0
        assert e["cat"] in CATEGORIES
    meta = [e for e in raw["traceEvents"] if e["ph"] == "M"]
    named = {(e["pid"], e["tid"]) for e in meta if e["name"] == "thread_name"}
    assert {(e["pid"], e["tid"]) for e in complete} <= named
    assert {e["args"]["name"] for e in meta if e["name"] == "process_name"} == {"H100"}
    assert {"forward", "backward", "comm", "optimizer"} <= {e["cat"] for e in complete}


def test_trace_round_trips(simulated, tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(simulated.events, path, {"step_s": simulated.step_s})
    events, meta = load_chrome_trace(path)
    assert meta["step_s"] == simulated.step_s
    assert len(events) == len(simulated.events)
    for got, want in zip(events, simulated.events, strict=True):
        assert (got.lane, got.name, got.category, got.kind, got.stream) == \
            (want.lane, want.name, want.category, want.kind, want.stream)
        assert got.start_s == pytest.approx(want.start_s, abs=1e-12)
        assert got.dur_s == pytest.approx(want.dur_s, abs=1e-12)


def test_emulated_runs_are_labelled(tmp_path):
    events = [TraceEvent(lane="h100:0", name="F0", category="forward", start_s=0, dur_s=1e-3,
                         kind="H100"),
              TraceEvent(lane="br104:0", name="F0", category="forward", start_s=1e-3,
                         dur_s=2e-3, kind="BR104")]
    path = tmp_path / "t.json"
    write_chrome_trace(events, path, {"emulated": True})
    raw = json.loads(path.read_text())
    names = [e["args"]["name"] for e in raw["traceEvents"] if e["name"] == "process_name"]
    assert names == ["H100 (emulated)", "BR104 (emulated)"]
    assert raw["otherData"]["emulated"] is True
    pids = {e["pid"] for e in raw["traceEvents"] if e["ph"] == "X"}
    assert len(pids) == 2  # one process per kind


def test_bad_traces_are_refused(tmp_path):
    with pytest.raises(TraceError, match="category"):
        write_chrome_trace([TraceEvent("d", "x", "nap", 0.0, 1.0)], tmp_path / "a.json")
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(TraceError, match="not valid JSON"):
        load_chrome_trace(bad)
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "F0", "ts": -1, "dur": 1,
                                                "pid": 1, "tid": 1}]}))
    with pytest.raises(TraceError, match="negative"):
        load_chrome_trace(bad)
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "F0", "ts": 0}]}))
    with pytest.raises(TraceError, match="lacks dur, pid, tid"):
        load_chrome_trace(bad)

"""The Gantt chart draws simulated (and loaded) traces as PNG files."""

from __future__ import annotations

from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.sim import simulate_plan
from hetrain.sim.gantt import draw_gantt
from hetrain.trace import load_chrome_trace, write_chrome_trace

from .helpers import SEQ_LEN, line_cluster, pipeline_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_gantt_png_of_a_simulated_step(tmp_path):
    cluster = line_cluster(4, latency_us=10)
    plan = pipeline_plan(cluster, 2, 4, pipelines=2)
    result = simulate_plan(plan, cluster, CostModel(cluster, model_spec(model_config("tiny"),
                                                                        SEQ_LEN)))
    out = draw_gantt(result.events, tmp_path / "gantt.png", title="two by two")
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)

    # a trace read back from disk (as the runtime writes it) draws the same way, lanes chosen
    write_chrome_trace(result.events, tmp_path / "t.json")
    events, _ = load_chrome_trace(tmp_path / "t.json")
    again = draw_gantt(events, tmp_path / "again.png", lanes=["n0:0", "n1:0"])
    assert again.read_bytes().startswith(PNG_MAGIC)


def test_gantt_of_no_events_still_draws(tmp_path):
    assert draw_gantt([], tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)

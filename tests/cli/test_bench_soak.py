"""`hetrain bench soak`: its JSON holds memory, descriptors and tokens/s over the run, and the
figures flag a leak (growth from the baseline step to the end) and a slowdown."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetrain.cli.bench_soak import Sample, soak_figures
from hetrain.cli.main import app
from tests.conftest import EXAMPLES

MB = 1 << 20


def samples(rss_end_mb: int, fds_end: int) -> list[Sample]:
    return [Sample(1, 0.0, 100 * MB, [200 * MB, 200 * MB], 30, [20, 20]),
            Sample(10, 1.0, 100 * MB, [210 * MB, 210 * MB], 30, [22, 22]),
            Sample(29, 3.0, 100 * MB, [210 * MB, rss_end_mb * MB], 30, [22, fds_end])]


def test_steady_run_meets_the_targets_and_a_leak_or_a_slowdown_does_not():
    steady = soak_figures(samples(210, 22), [0.1] * 30, 100, baseline=10)
    assert steady["rss_growth_pct"]["workers"] == 0.0 and steady["fd_growth"]["workers"] == 0
    assert steady["tokens_per_s_after_baseline"] == pytest.approx(1000.0)
    assert all(steady["passed"].values())
    leak = soak_figures(samples(240, 25), [0.1] * 30, 100, baseline=10)
    assert leak["rss_growth_pct"]["worst_worker"] == pytest.approx(100 * 30 / 210)
    assert leak["fd_growth"]["workers"] == 3
    assert not leak["passed"]["rss"] and not leak["passed"]["fds"]
    slower = soak_figures(samples(210, 22), [0.1] * 20 + [0.2] * 10, 100, baseline=10)
    assert slower["tokens_per_s_change_pct"] == pytest.approx(-50.0)
    assert not slower["passed"]["tokens_per_s"] and slower["passed"]["rss"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_soak_bench_writes_its_figures(tmp_path):
    out = tmp_path / "soak.json"
    done = CliRunner().invoke(app, [
        "bench", "soak", "--cluster", str(EXAMPLES / "clusters" / "three-kinds.yaml"),
        "--steps", "30", "--checkpoint-every", "5", "--sample-every", "10",
        "--time-scale", "1e-9", "--json", str(out)])
    assert done.exit_code == 0, done.output
    figures = json.loads(out.read_text())
    assert figures["emulated"] and figures["steps"] == 30 and figures["baseline_step"] == 10
    # Samples: the start, every 10 steps (never as a checkpoint is written), the end.
    assert [s["step"] for s in figures["samples"]] == [1, 11, 21, 29]
    for s in figures["samples"]:
        assert len(s["worker_rss_bytes"]) == len(figures["devices"]) == len(s["worker_fds"])
        assert s["launcher_rss_bytes"] > 0 and min(s["worker_fds"]) > 0
    assert set(figures["rss_growth_pct"]) == {"launcher", "workers", "worst_worker"}
    assert set(figures["fd_growth"]) == {"launcher", "workers"}
    assert figures["tokens_per_s_last_window"] > 0 and figures["tokens_per_s_after_baseline"] > 0
    assert len(figures["tokens_per_s_windows"]) == 3
    assert set(figures["passed"]) == {"rss", "fds", "tokens_per_s"}

"""`hetrain bench search`: the planner's search time over clusters, in round-robin rounds."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from hetrain.cli.bench_search import Case, bench_search, random_cluster
from hetrain.cli.main import app
from hetrain.cluster.loading import load_cluster
from tests.conftest import EXAMPLES
from tests.refusals import cli_refused


def test_random_clusters_are_uneven_and_repeatable():
    for seed in range(20):
        a = random_cluster(random.Random(seed), "a").kind_counts()
        assert a == random_cluster(random.Random(seed), "b").kind_counts()
        assert 3 <= len(a) <= 8 and sum(a.values()) <= 2048
    odd = [n % 8 for seed in range(20)
           for n in random_cluster(random.Random(seed), "c").kind_counts().values()]
    assert sum(r != 0 for r in odd) > len(odd) / 2  # mostly a node of the rest


def test_bench_search_reports_each_cluster_over_rounds():
    three = load_cluster(EXAMPLES / "clusters" / "three-kinds.yaml")
    cases = [Case("three", three, 16), Case("three-big-batch", three, 64)]
    out = bench_search(cases, "tiny", rounds=2)
    rows = {row["name"]: row for row in out["clusters"]}
    assert list(rows) == ["three", "three-big-batch"] and out["rounds"] == 2
    for row in rows.values():
        assert 0 < row["search_s_min"] <= row["search_s"] <= row["search_s_max"]
        assert row["step_s"] > 0 and row["error"] is None
        assert row["devices"] == len(three.devices) and row["kinds"] == 3
    assert out["max_search_s"] == max(row["search_s"] for row in rows.values())
    assert out["over_limit"] == [n for n, row in rows.items() if row["search_s"] > 10]
    assert "simulated" in out["figures"] and "measured" in out["figures"]


def test_bench_search_cli_writes_json(tmp_path):
    out = tmp_path / "search.json"
    done = CliRunner().invoke(app, [
        "bench", "search", "--cluster", str(EXAMPLES / "clusters" / "three-kinds.yaml"),
        "--global-batch", "16", "--model", "tiny", "--rounds", "1", "--json", str(out)])
    assert done.exit_code == 0, done.output
    figures = json.loads(out.read_text())
    assert [row["name"] for row in figures["clusters"]] == ["three-kinds"]
    assert "three-kinds" in done.output


def test_bench_search_refuses_a_missing_cluster(sandbox):
    cli_refused(sandbox, ["bench", "search", "--cluster", "missing.yaml"], "missing.yaml")

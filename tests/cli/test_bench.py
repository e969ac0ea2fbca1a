"""bench dp / pp helpers: variants interleaved in rounds, figures as median, min and max."""

from __future__ import annotations

from hetrain.cli.bench import interleaved_runs, spread, spread_by_key


def test_variants_interleave_in_rotated_rounds():
    order: list[str] = []
    runs = interleaved_runs(lambda name: order.append(name) or len(order), ["a", "b", "c"], 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [sorted(r) for r in runs] == [["a", "b", "c"]] * 3
    assert runs[1]["a"] == 6  # each round holds its own runs


def test_figures_are_median_min_max():
    out: dict = {}
    spread(out, "efficiency", [0.9, 0.99, 0.95])
    assert (out["efficiency"], out["efficiency_min"], out["efficiency_max"]) == (0.95, 0.9, 0.99)
    spread_by_key(out, "alone", [{"x": 1.0, "y": 5.0}, {"x": 3.0, "y": 4.0},
                                 {"x": 2.0, "y": 6.0}])
    assert out["alone"] == {"x": 2.0, "y": 5.0}
    assert out["alone_min"] == {"x": 1.0, "y": 4.0} and out["alone_max"] == {"x": 3.0, "y": 6.0}

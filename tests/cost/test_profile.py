"""Measured profiles: timing the reference model's layers, files, and the cost model using them."""

from __future__ import annotations

import json

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cluster.kinds import CATALOG
from hetrain.cost import CostModel, Profile
from hetrain.cost.model import tp_comm_passes
from hetrain.cost.profile import KindProfile, ProfileEntry, measure_profile
from hetrain.errors import CostError
from hetrain.model import model_config, model_spec
from hetrain.plan import StageGroup


@pytest.fixture(scope="module")
def tiny_profile():
    return measure_profile(model_config("tiny"), {"cpu": ["cpu"]}, CATALOG, seq_len=16,
                           repeats=1)


def test_measures_every_layer(tiny_profile):
    kp = tiny_profile.kinds["cpu"]
    n = model_spec(model_config("tiny"), 16).n_layers
    (entry,) = kp.entries
    assert (entry.tp, entry.micro_batch_size) == (1, 1)
    assert len(entry.forward_s_per_token) == len(entry.backward_s_per_token) == n
    assert all(x > 0 for x in entry.forward_s_per_token + entry.backward_s_per_token)
    assert kp.device == "cpu" and kp.dtype == "fp32"
    assert tiny_profile.has("cpu") and not tiny_profile.has("H100")


def test_round_trip_and_cost_model(tiny_profile, tmp_path):
    path = tmp_path / "p.json"
    tiny_profile.save(path)
    loaded = Profile.load(path)
    assert loaded == tiny_profile
    spec = model_spec(model_config("tiny"), 16)
    loaded.check_layers(spec.n_layers, "tiny")
    cluster = cluster_from_dict({"nodes": [{"name": "c", "kind": "cpu", "count": 2}]})
    cost = CostModel(cluster, spec, loaded)
    kp = loaded.kinds["cpu"].entries[0]
    want = 32 * sum(kp.backward_s_per_token[1:3]) / 2  # tp 2 not measured: tp 1's work / 2
    got = cost.layers_compute_s("cpu", (1, 3), 32, "backward", "fp32", tp=2)
    assert spec.sequence_parallel(2)  # backward gathers the saved shards again: 1.5 passes
    assert got == pytest.approx(want + tp_comm_passes("backward", True, False)
                                * cost.tp_comm_s("cpu", (1, 3), 32, "fp32", 2))


def test_bad_files_name_the_problem(tmp_path, tiny_profile):
    with pytest.raises(CostError, match="cannot read"):
        Profile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CostError, match="not valid JSON"):
        Profile.load(bad)
    raw = tiny_profile.model_dump()
    raw["kinds"]["cpu"]["entries"][0]["forward_s_per_token"] = [-1.0] * 6
    bad.write_text(json.dumps(raw))
    with pytest.raises(CostError, match=">= 0"):
        Profile.load(bad)
    with pytest.raises(CostError, match="hetrain profile --model small"):
        tiny_profile.check_layers(10, "small")


# --- per (tp, micro-batch size) entries ---------------------------------------------------------
SPEC = model_spec(model_config("tiny"), 16)
N = SPEC.n_layers
CPU4 = cluster_from_dict({"nodes": [{"name": "c", "kind": "cpu", "count": 4}]})


def entry(tp: int, mbs: int, scale: float) -> ProfileEntry:
    return ProfileEntry(tp=tp, micro_batch_size=mbs,
                        forward_s_per_token=[scale * 1e-6 * (i + 1) for i in range(N)],
                        backward_s_per_token=[scale * 2e-6 * (i + 1) for i in range(N)])


def profile_of(*entries: ProfileEntry) -> Profile:
    return Profile(model="tiny", seq_len=16,
                   kinds={"cpu": KindProfile(device="cpu", dtype="fp32", entries=list(entries))})


def test_a_measured_tp_figure_is_honoured():
    # Measured: TP 4 runs 15 % slower than a quarter of TP 1 (its all-reduces included).
    cost = CostModel(CPU4, SPEC, profile_of(entry(1, 1, 1.0), entry(4, 1, 1.15 / 4)))
    for op in ("forward", "backward"):
        tp1 = cost.layers_compute_s("cpu", (1, 4), 16, op, "fp32", tp=1)
        tp4 = cost.layers_compute_s("cpu", (1, 4), 16, op, "fp32", tp=4)
        assert tp4 == pytest.approx(1.15 * tp1 / 4, rel=1e-12)
    # Without the TP-4 entry the old rule holds: TP 1 divided by 4, plus the modelled comm.
    plain = CostModel(CPU4, SPEC, profile_of(entry(1, 1, 1.0)))
    want = plain.layers_compute_s("cpu", (1, 4), 16, "forward", "fp32", tp=1) / 4 + \
        plain.tp_comm_s("cpu", (1, 4), 16, "fp32", 4)
    assert plain.layers_compute_s("cpu", (1, 4), 16, "forward", "fp32", tp=4) == \
        pytest.approx(want, rel=1e-12)
    # The stage time the schedule reads follows the measured entry too.
    g = StageGroup(name="g", kind="cpu", devices=[f"c:{i}" for i in range(4)], layers=(1, 4),
                   dtype="fp32")
    assert cost.stage_compute_s(g, "forward", 1, 16) > plain.stage_compute_s(g, "forward", 1, 16)


def test_unmeasured_tp_scales_from_the_nearest_degree():
    cost = CostModel(CPU4, SPEC, profile_of(entry(1, 1, 1.0), entry(4, 1, 0.3)))
    tp4 = cost.profile.forward_s("cpu", 0, N, 16, tp=4)
    # tp 8: from tp 4 (the nearest), its work halved.
    assert cost.profile.forward_s("cpu", 0, N, 16, tp=8) == pytest.approx(tp4 / 2, rel=1e-12)
    assert not cost.profile.measured_tp("cpu", 8) and cost.profile.measured_tp("cpu", 4)


def test_micro_batch_sizes_interpolate_per_token():
    prof = profile_of(entry(1, 1, 2.0), entry(1, 4, 1.0))  # per token cheaper at mbs 4
    per_token = [prof.forward_s("cpu", 0, N, 16 * m) / (16 * m) for m in (1, 2, 4, 8)]
    assert per_token[0] == pytest.approx(2 * per_token[2], rel=1e-12)
    # mbs 2 lies a third of the way from 1 to 4: per token 2 - 1/3.
    assert per_token[1] == pytest.approx(per_token[2] * (2 - 1 / 3), rel=1e-12)
    assert per_token[3] == pytest.approx(per_token[2], rel=1e-12)  # beyond: the nearest


def test_tables_follow_measured_entries():
    from hetrain.cost.tables import TableCache

    cost = CostModel(CPU4, SPEC, profile_of(entry(1, 1, 1.0), entry(4, 2, 0.4),
                                              entry(1, 4, 0.7)))
    for tp, mbs in ((4, 2), (4, 1), (2, 3), (1, 2)):
        tables = TableCache(cost).get("cpu", tp, "fp32", mbs)
        g = StageGroup(name="g", kind="cpu", devices=[f"c:{i}" for i in range(tp)],
                       layers=(1, 4), dtype="fp32")
        want = sum(cost.stage_compute_s(g, op, mbs, 16) for op in ("forward", "backward"))
        assert tables.time_s[0][1, 4] == pytest.approx(want, rel=1e-12)


def test_format_1_files_still_load(tmp_path):
    old = {"format": "hetrain-profile/1", "model": "tiny", "seq_len": 16, "micro_batch_size": 2,
           "kinds": {"cpu": {"device": "cpu", "dtype": "fp32",
                             "forward_s_per_token": [1e-6] * N,
                             "backward_s_per_token": [2e-6] * N}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    prof = Profile.load(path)
    (e,) = prof.kinds["cpu"].entries
    assert (e.tp, e.micro_batch_size) == (1, 2) and e.backward_s_per_token == [2e-6] * N
    # The old rule: the tp-1 figure divided by the TP degree.
    assert prof.forward_s("cpu", 0, N, 32, tp=2) == pytest.approx(32 * N * 1e-6 / 2)
    path.write_text(json.dumps(old | {"format": "hetrain-profile/9"}))
    with pytest.raises(CostError, match="re-run 'hetrain profile'"):
        Profile.load(path)


def test_simulate_and_plan_take_a_profile(tmp_path):
    from typer.testing import CliRunner

    from hetrain.cli.main import app

    cluster = tmp_path / "c.yaml"
    cluster.write_text("nodes:\n  - {name: c, kind: cpu, count: 2}\n")
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    spec = model_spec(model_config("tiny"), 16)
    for path, scale in ((fast, 1.0), (slow, 3.0)):
        Profile(model="tiny", seq_len=16, kinds={"cpu": KindProfile(
            device="cpu", dtype="fp32", entries=[ProfileEntry(
                forward_s_per_token=[scale * 1e-5] * spec.n_layers,
                backward_s_per_token=[scale * 2e-5] * spec.n_layers)])}).save(path)
    steps = []
    for prof in (fast, slow):
        out = tmp_path / f"sim-{prof.stem}.json"
        result = CliRunner().invoke(app, ["simulate", "--cluster", str(cluster), "--model", "tiny",
                                          "--global-batch", "8", "--seq-len", "16",
                                          "--profile", str(prof), "--json", str(out)])
        assert result.exit_code == 0, result.output
        steps.append(json.loads(out.read_text())["step_s"])
        result = CliRunner().invoke(app, ["plan", "--cluster", str(cluster), "--model", "tiny",
                                          "--global-batch", "8", "--seq-len", "16",
                                          "--profile", str(prof)])
        assert result.exit_code == 0, result.output
    assert steps[1] > 2 * steps[0]  # compute dominates this step: 3x slower per token


def test_a_profile_prices_half_layers_as_its_blocks(tiny_profile):
    """In half layers (Plan.half_layers) a measured block's seconds are split between its
    halves by their FLOPs: any whole-block range costs what it cost in whole layers."""
    from hetrain.model.loading import load_model

    spec = load_model("tiny").spec(16)
    cluster = cluster_from_dict({"nodes": [{"name": "c", "kind": "cpu", "count": 2}]})
    cost = CostModel(cluster, spec, tiny_profile)
    halves = cost.units(True)
    assert halves.spec is spec.halves and cost.units(True) is halves
    assert halves.units(True) is halves and cost.units(False) is cost
    for op in ("forward", "backward"):
        for tp in (1, 2):
            whole = cost.layers_compute_s("cpu", (1, 3), 32, op, "fp32", tp)
            assert halves.layers_compute_s("cpu", (1, 5), 32, op, "fp32", tp) \
                == pytest.approx(whole)
        attn = halves.layers_compute_s("cpu", (1, 2), 32, op, "fp32")
        ffn = halves.layers_compute_s("cpu", (2, 3), 32, op, "fp32")
        flops = [lay.forward_flops_per_token for lay in spec.halves.layers[1:3]]
        assert attn / ffn == pytest.approx(flops[0] / flops[1])

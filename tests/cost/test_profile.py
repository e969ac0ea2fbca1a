"""Measured profiles: timing the reference model's layers, files, and the cost model using them."""

from __future__ import annotations

import json

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cluster.kinds import CATALOG
from hetrain.cost import CostModel, Profile
from hetrain.cost.profile import measure_profile
from hetrain.errors import CostError
from hetrain.model import model_config, model_spec


@pytest.fixture(scope="module")
def tiny_profile():
    return measure_profile(model_config("tiny"), {"cpu": ["cpu"]}, CATALOG, seq_len=16,
                           repeats=1)


def test_measures_every_layer(tiny_profile):
    kp = tiny_profile.kinds["cpu"]
    n = model_spec(model_config("tiny"), 16).n_layers
    assert len(kp.forward_s_per_token) == len(kp.backward_s_per_token) == n
    assert all(x > 0 for x in kp.forward_s_per_token + kp.backward_s_per_token)
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
    kp = loaded.kinds["cpu"]
    want = 32 * sum(kp.backward_s_per_token[1:3]) / 2
    got = cost.layers_compute_s("cpu", (1, 3), 32, "backward", "fp32", tp=2)
    assert got == pytest.approx(want + cost.tp_comm_s("cpu", (1, 3), 32, "fp32", 2))


def test_bad_files_name_the_problem(tmp_path, tiny_profile):
    with pytest.raises(CostError, match="cannot read"):
        Profile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CostError, match="not valid JSON"):
        Profile.load(bad)
    raw = tiny_profile.model_dump()
    raw["kinds"]["cpu"]["forward_s_per_token"] = [-1.0] * 6
    bad.write_text(json.dumps(raw))
    with pytest.raises(CostError, match=">= 0"):
        Profile.load(bad)
    with pytest.raises(CostError, match="hetrain profile --model small"):
        tiny_profile.check_layers(10, "small")

"""Cluster YAML: the catalog, user kinds, and one-line errors naming the field (exit 2)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.cluster import CATALOG, cluster_from_dict, load_cluster
from hetrain.errors import ClusterError
from tests.conftest import EXAMPLES

REQUIRED_KINDS = ["H100", "H800", "H20", "A100-40GB", "A100-80GB", "V100", "L40S", "RTX4090",
                  "MI250X", "MI300X", "Ascend910B", "BR104", "MLU370", "Gaudi2", "cpu"]


def test_catalog_has_the_kinds_and_v100_has_no_bf16():
    assert set(REQUIRED_KINDS) <= set(CATALOG)
    assert not CATALOG["V100"].supports("bf16")
    assert CATALOG["MI300X"].backend == "nccl" and CATALOG["Ascend910B"].backend == "hccl"


def test_examples_load(three_kinds, mixed_1024):
    assert three_kinds.kind_counts() == {"H100": 1, "BR104": 1, "A100-80GB": 1}
    assert len(mixed_1024.devices) == 1024 and len(mixed_1024.kind_counts()) == 4


def test_user_kind_and_alias():
    c = cluster_from_dict({
        "kinds": [{"name": "acme-x1", "vendor": "acme", "backend": "gloo",
                   "flops": {"bf16": 1e14}, "memory_gib": 16, "memory_bandwidth_gbps": 500}],
        "nodes": [{"name": "n0", "kind": "acme-x1", "count": 2},
                  {"name": "n1", "kind": "910b"}]})
    assert c.kind_counts() == {"acme-x1": 2, "Ascend910B": 1}


def test_without_removes_a_device(three_kinds):
    assert three_kinds.without({"h100:0"}).kind_counts() == {"BR104": 1, "A100-80GB": 1}


BAD = {
    "syntax": ("nodes:\n  - {name: a, kind: H100\n", "YAML syntax error at line"),
    "unknown kind": ("nodes:\n  - {name: a, kind: H999}\n", "nodes[0].kind: unknown kind 'H999'"),
    "negative count": ("nodes:\n  - {name: a, kind: H100, count: -2}\n",
                       "nodes[0].count: Input should be greater than 0"),
    "missing field": ("nodes:\n  - {kind: H100}\n", "nodes[0].name: missing required field"),
    "misspelt field": ("nodes:\n  - {name: a, kind: H100, cout: 2}\n",
                       "nodes[0].cout: unknown field"),
    "no nodes": ("name: x\n", "nodes: missing required field"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_cluster_yaml_is_one_line_exit_2(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ClusterError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_cluster(path)
    result = CliRunner().invoke(app, ["devices", "--cluster", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and str(path.name) in lines[0]


def test_train_with_bad_cluster_writes_nothing(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes:\n  - {name: a, kind: H999}\n")
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["train", "--cluster", str(path), "--json", str(out)])
    assert result.exit_code == 2 and not out.exists()


def test_example_cluster_files_are_valid():
    for path in (EXAMPLES / "clusters").glob("*.yaml"):
        load_cluster(path)


def test_train_with_plan_for_another_cluster_is_refused(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: tiny\nseq_len: 16\nglobal_batch: 2\nstage_groups:\n"
                    "  - {name: a, kind: H100, devices: ['h100-7:0'], layers: [0, 6]}\n"
                    "routes:\n  - {stages: [a], micro_batches: 1, micro_batch_size: 2}\n")
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["train", "--cluster",
                                      str(EXAMPLES / "clusters" / "three-kinds.yaml"),
                                      "--plan", str(plan), "--json", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert "'h100-7:0' is not in the cluster" in result.output
    assert "train" not in result.output.split("error:")[0]  # refused before any progress

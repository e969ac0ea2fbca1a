"""Checkpoints: taken under one plan, resumed exactly under another (other kinds, stages and
TP degrees); written atomically; damaged ones refused with a message naming the file, and the
previous good one used; exported as safetensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from hetrain.cluster import load_cluster
from hetrain.errors import CheckpointError
from hetrain.plan import expand_plan
from hetrain.runtime.checkpoint import (
    LATEST,
    MANIFEST,
    committed_steps,
    find_latest,
    read_model,
    step_dir,
    verify_checkpoint,
)
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, assert_params_match_reference, run_plan

pytestmark = pytest.mark.slow

SHAPE = {"model": "tiny", "seq_len": 16, "micro_batch_size": 2}


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


@pytest.fixture(scope="module")
def three_kinds_run(cluster, tmp_path_factory):
    """4 steps on three kinds (a TP-2 stage in a pipeline, plus a data-parallel replica),
    checkpointed at steps 2 and 4."""
    plan = expand_plan({**SHAPE, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 3]},
                                        {"kind": "BR104", "layers": [3, 6]}]},
        {"micro_batches": 1, "stages": [{"kind": "A100-80GB", "layers": [0, 6]}]},
    ]}, cluster)
    root = tmp_path_factory.mktemp("ckpt")
    result = run_plan(cluster, plan, steps=4, checkpoint_dir=str(root), checkpoint_every=2)
    assert_matches_reference(result, steps=4)
    return root, result


def two_kinds_plan(cluster):
    """Another layout on two of the kinds: TP 2 on A100 for the first layers, H100 after."""
    return expand_plan({**SHAPE, "pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "A100-80GB", "tp": 2, "layers": [0, 2]},
                                        {"kind": "H100", "layers": [2, 6]}]},
    ]}, cluster)


def copy_of(root, tmp_path):
    shutil.copytree(root, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_layout_on_disk(three_kinds_run):
    root, _ = three_kinds_run
    assert committed_steps(root) == [4, 2]
    assert (root / LATEST).read_text().strip() == "step-000004"
    manifest = verify_checkpoint(step_dir(root, 4))
    assert manifest["step"] == 4 and ".metadata" in manifest["files"]
    meta = json.loads((step_dir(root, 4) / "meta.json").read_text())
    assert meta["plan"]["stage_groups"][0]["devices"] == ["h100:0", "h100:1"]
    assert not list(root.glob("*.tmp"))


def test_corrupted_file_is_refused_by_name(three_kinds_run, tmp_path):
    root = copy_of(three_kinds_run[0], tmp_path)
    data = next(p for p in sorted(step_dir(root, 4).glob("*.distcp")) if p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"file {data.name} is corrupted: SHA-256"):
        verify_checkpoint(step_dir(root, 4))
    found = find_latest(root)
    assert found.step == 2 and "corrupted" in found.refused[0]


def test_truncated_and_unfinished_checkpoints_are_refused(three_kinds_run, tmp_path):
    root = copy_of(three_kinds_run[0], tmp_path)
    meta = step_dir(root, 4) / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"file \.metadata is truncated or altered"):
        verify_checkpoint(step_dir(root, 4))
    (step_dir(root, 2) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        verify_checkpoint(step_dir(root, 2))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_latest(root)


def test_three_kinds_checkpoint_resumes_on_two_kinds_past_a_corrupted_one(
        cluster, three_kinds_run, tmp_path, capfd):
    """The newest checkpoint (step 4) is damaged: the resume refuses it by name, takes the
    step-2 one, taken on three kinds with TP 2 on H100, and goes on on two kinds with TP 2 on
    A100 and other layer ranges, exactly. Its own checkpoints (TP-sharded writers) are whole."""
    root = copy_of(three_kinds_run[0], tmp_path)
    victim = max(step_dir(root, 4).glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
    plan = two_kinds_plan(cluster)
    result = run_plan(cluster, plan, steps=6, checkpoint_dir=str(root), checkpoint_every=2,
                      resume=True)
    assert len(result.losses) == 4  # steps 2..5: resumed from the good step-2 checkpoint
    assert_params_match_reference(result.params, "tiny", 6, plan.global_batch, plan.seq_len,
                                  losses=result.losses)
    err = capfd.readouterr().err
    assert f"file {victim.name} is corrupted" in err and "resuming from" in err
    assert committed_steps(root) == [6, 4, 2] and verify_checkpoint(step_dir(root, 4))
    saved, meta = read_model(step_dir(root, 6))
    assert meta["plan"]["stage_groups"][0]["devices"] == ["a100:0", "a100:1"]
    for name, value in result.params.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_export_writes_safetensors(three_kinds_run, tmp_path):
    from safetensors.torch import load_file

    from hetrain.cli.main import app

    root, result = three_kinds_run
    out = tmp_path / "model.safetensors"
    run = CliRunner().invoke(app, ["export", "--checkpoint", str(root), "--out", str(out)])
    assert run.exit_code == 0, run.output
    tensors = load_file(out)
    assert set(tensors) == set(result.params)
    for name, value in result.params.items():
        torch.testing.assert_close(tensors[name], value, rtol=0, atol=0)
    params, meta = read_model(step_dir(root, 4))
    assert meta["step"] == 4 and set(params) == set(tensors)


def test_export_refuses_a_damaged_checkpoint(three_kinds_run, tmp_path):
    from hetrain.cli.main import app

    root = copy_of(three_kinds_run[0], tmp_path)
    for ckpt in (step_dir(root, 2), step_dir(root, 4)):
        (ckpt / ".metadata").write_bytes(b"x")
    run = CliRunner().invoke(app, ["export", "--checkpoint", str(step_dir(root, 4)),
                                   "--out", str(tmp_path / "m.safetensors")])
    assert run.exit_code == 2
    assert "truncated or altered" in run.output

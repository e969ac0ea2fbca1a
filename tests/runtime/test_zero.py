"""ZeRO-1 (plan.sharded_optimizer): each holder keeps AdamW state only for its shard of every
gradient bucket, sized by its group's shard_weight, yet training stays exact; checkpoints
taken under sharded state resume on another plan."""

from __future__ import annotations

import shutil

import pytest
import torch.distributed.checkpoint as dcp

from hetrain.cluster import load_cluster
from hetrain.plan import expand_plan
from hetrain.plan.types import Plan
from hetrain.runtime.checkpoint import committed_steps, step_dir
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, assert_params_match_reference, run_plan

pytestmark = pytest.mark.slow

SHAPE = {"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "sharded_optimizer": True}


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def weighted(plan: Plan, weight_of_kind: dict[str, float]) -> Plan:
    raw = plan.model_dump()
    for g in raw["stage_groups"]:
        g["shard_weight"] = weight_of_kind.get(g["kind"], 1.0)
    return Plan.model_validate(raw)


@pytest.fixture(scope="module")
def uneven_run(cluster, tmp_path_factory):
    """Every weight on three kinds (H100 TP 2, A100, BR104 with shard weights 1, 2, 3): mixed
    TP degrees, so full tensors; 2 steps, checkpointed at step 2."""
    plan = weighted(expand_plan({**SHAPE, "data_parallel": [
        {"kind": "H100", "tp": 2, "samples": 4}, {"kind": "A100-80GB", "samples": 2},
        {"kind": "BR104", "samples": 4}], "n_layers": 6}, cluster),
        {"H100": 1.0, "A100-80GB": 2.0, "BR104": 3.0})
    root = tmp_path_factory.mktemp("zero-ckpt")
    result = run_plan(cluster, plan, steps=2, checkpoint_dir=str(root), checkpoint_every=2)
    return root, result


def test_uneven_shards_across_kinds_are_exact(uneven_run):
    _, result = uneven_run
    assert_matches_reference(result, steps=2)
    numel = sum(p.numel() for p in result.params.values())
    # Devices weigh 1, 1 (H100), 2 (A100), 3 (BR104): each keeps two moments for its share.
    for group in result.per_group.values():
        share = {"H100": 1, "A100-80GB": 2, "BR104": 3}[group["kind"]] / 7
        moments_bytes = 2 * 8 * numel * share  # float64
        assert abs(group["optimizer_bytes"] - moments_bytes) < 0.01 * moments_bytes


def test_shard_wise_tensor_parallel_under_zero_bubble(cluster):
    """TP 2 holders of two kinds sum shard by shard (DTensor shards); A100s keep twice the
    optimizer state of H100s; backward split into input and weight gradients."""
    plan = weighted(expand_plan({**SHAPE, "schedule": "zero_bubble", "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 3]},
                                        {"kind": "A100-80GB", "tp": 2, "layers": [3, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 2]},
                                        {"kind": "A100-80GB", "tp": 2, "layers": [2, 6]}]},
    ]}, cluster), {"A100-80GB": 2.0})
    assert_matches_reference(run_plan(cluster, plan, steps=2), steps=2)


def test_sharded_checkpoint_resumes_on_another_plan(cluster, uneven_run, tmp_path):
    """The checkpoint holds whole AdamW state per weight; a pipeline of other kinds, layer
    ranges and shard weights slices it into its own shards and goes on exactly."""
    root = tmp_path / "ckpt"
    shutil.copytree(uneven_run[0], root)
    stored = dcp.FileSystemReader(step_dir(root, 2)).read_metadata().state_dict_metadata
    for name, value in uneven_run[1].params.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(stored[f"optim/{name}/{key}"].size) == tuple(value.shape)
    plan = weighted(expand_plan({**SHAPE, "schedule": "zero_bubble", "pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "A100-80GB", "layers": [0, 4]},
                                        {"kind": "H100", "layers": [4, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "BR104", "layers": [0, 6]}]},
    ]}, cluster), {"BR104": 0.5})
    result = run_plan(cluster, plan, steps=4, checkpoint_dir=str(root), checkpoint_every=2,
                      resume=True)
    assert len(result.losses) == 2 and committed_steps(root)[0] == 4
    assert_params_match_reference(result.params, "tiny", 4, plan.global_batch, plan.seq_len,
                                  losses=result.losses)


def test_checkpoint_over_whole_layers_resumes_cut_at_half_layers(cluster, uneven_run,
                                                                  tmp_path):
    """Parameters keep their names in half layers (Plan.half_layers): a checkpoint taken
    over whole layers under sharded state resumes on a pipeline cut inside blocks (units:
    0 embedding, 2i + 1 / 2i + 2 block i's halves, 9 head) and goes on exactly."""
    root = tmp_path / "ckpt"
    shutil.copytree(uneven_run[0], root)
    plan = expand_plan({**SHAPE, "schedule": "zero_bubble", "half_layers": True,
                        "pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "A100-80GB", "layers": [0, 4]},
                                        {"kind": "H100", "tp": 2, "layers": [4, 7]},
                                        {"kind": "BR104", "layers": [7, 10]}]},
        {"micro_batches": 2, "stages": [{"kind": "A100-80GB", "layers": [0, 5]},
                                        {"kind": "BR104", "layers": [5, 10]}]},
    ]}, cluster)
    result = run_plan(cluster, plan, steps=4, checkpoint_dir=str(root), checkpoint_every=2,
                      resume=True)
    assert len(result.losses) == 2 and committed_steps(root)[0] == 4
    assert_params_match_reference(result.params, "tiny", 4, plan.global_batch, plan.seq_len,
                                  losses=result.losses)

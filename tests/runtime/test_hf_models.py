"""Hugging Face causal LMs under every plan form: uneven pipelines split at decoder layers
(differently per route), a TP-2 stage group, three kinds, tied embeddings; after 3 steps every
parameter equals one-process training of the Hugging Face model itself (float64, rtol 1e-5).
Then `hetrain train --model config.json` and `hetrain export --hf-folder` round trip."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import hetrain
from hetrain.cluster import load_cluster
from hetrain.data.loading import load_corpus
from hetrain.model.loading import load_model
from hetrain.plan import expand_plan
from hetrain.runtime import TrainConfig
from hetrain.runtime.reference import train_reference
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import assert_matches_reference, run_plan, small_corpus

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

FIXTURES = ROOT / "tests" / "fixtures"
# 6 layers: embedding, 4 decoder layers, norm + head. Two routes cut differently; the first
# starts on a TP-2 group of H100s; three kinds in all.
PIPELINES = [
    {"micro_batches": 3, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 3]},
                                    {"kind": "A100-80GB", "layers": [3, 6]}]},
    {"micro_batches": 2, "stages": [{"kind": "BR104", "layers": [0, 2]},
                                    {"kind": "A100-80GB", "layers": [2, 5]},
                                    {"kind": "H100", "layers": [5, 6]}]},
]


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def _plan(cluster, model: str):
    return expand_plan({"model": model, "seq_len": 16, "micro_batch_size": 2,
                        "pipelines": PIPELINES}, cluster)


def test_llama_module_through_fit_with_a_plan(cluster):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan(cluster, "LlamaForCausalLM")
    result = hetrain.fit(model, small_corpus(), cluster=cluster, steps=3, plan=plan,
                         precision="float64", time_scale=1e-9)
    assert result.plan.stage_groups[0].tp == 2 and len(result.plan.kinds()) == 3
    fresh = transformers.LlamaForCausalLM(cfg).double()
    fresh.load_state_dict(start)
    ref, _ = train_reference(TrainConfig(steps=3, precision="float64"), small_corpus(),
                             plan.global_batch, plan.seq_len, model=fresh)
    assert set(ref) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():  # fit copied the trained weights back
        torch.testing.assert_close(p.detach(), ref[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_qwen2_tied_from_its_config_json(cluster):
    # The plan names the config.json: every worker builds the same seeded weights from it.
    plan = _plan(cluster, str(FIXTURES / "hf-tiny-qwen2" / "config.json"))
    result = run_plan(cluster, plan, steps=3)
    assert "lm_head.weight" not in result.params  # tied: one weight, the embedding's
    assert any(name.endswith("q_proj.bias") for name in result.params)
    assert_matches_reference(result, steps=3)


def test_train_a_config_then_export_a_folder_from_pretrained_reads(tmp_path):
    cpus = tmp_path / "cpus.yaml"
    cpus.write_text("nodes:\n  - {name: c, kind: cpu, count: 2}\n")
    model = str(FIXTURES / "hf-tiny-llama" / "config.json")
    ckpt, folder = tmp_path / "ckpt", tmp_path / "hf"
    run = CliRunner().invoke(hetrain_app(), [
        "train", "--cluster", str(cpus), "--model", model, "--steps", "2", "--global-batch",
        "4", "--seq-len", "16", "--time-scale", "1e-9", "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", "2"])
    assert run.exit_code == 0, run.output
    out = CliRunner().invoke(hetrain_app(), ["export", "--checkpoint", str(ckpt),
                                             "--hf-folder", str(folder)])
    assert out.exit_code == 0, out.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # `hetrain train` without --data trains on the default corpus.
    ref, _ = train_reference(TrainConfig(model=model, steps=2, precision="float32"),
                             load_corpus(None, 0), 4, 16)
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p.detach(), ref[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # `--model FOLDER` trains on from_pretrained weights (not seeded ones).
    stage = load_model(folder).build_stage(0, 6, seed=123)
    for name, p in stage.canonical_parameters():
        torch.testing.assert_close(p, loaded.get_parameter(name))


def hetrain_app():
    from hetrain.cli.main import app

    return app

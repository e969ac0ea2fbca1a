"""The one model object: every `--model` form, HF stages that chain to the HF model itself,
specs from a config alone, and bad model files refused in one line (exit 2)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.errors import ModelError, PlanError
from hetrain.model import model_config, model_spec
from hetrain.model.loading import as_model, load_model
from hetrain.model.source import DecoderModel, WholeModule
from hetrain.plan import load_plan
from tests.conftest import EXAMPLES, ROOT

FIXTURES = ROOT / "tests" / "fixtures"
LLAMA_JSON = FIXTURES / "hf-tiny-llama" / "config.json"
QWEN2_JSON = FIXTURES / "hf-tiny-qwen2" / "config.json"
THREE = str(EXAMPLES / "clusters" / "three-kinds.yaml")


def test_every_model_form_resolves():
    assert isinstance(load_model("tiny"), DecoderModel)
    yaml_model = load_model(EXAMPLES / "models" / "tiny-gqa.yaml")
    assert yaml_model.spec(32).n_layers == 4 + 2 and yaml_model.tie_embeddings
    for path in (LLAMA_JSON, LLAMA_JSON.parent):  # a config.json, or the folder holding it
        hf = load_model(path)
        assert hf.n_layers == 6 and hf.name == str(path) and hf.hidden_size == 32
    with pytest.raises(ModelError, match="config.json or model folder, or a model YAML"):
        load_model("no-such-model")


def test_a_100b_yaml_is_priced_from_its_fields_alone():
    big = load_model(EXAMPLES / "models" / "dense-100b.yaml")
    assert 90e9 < big.spec(4096).params < 110e9
    with pytest.raises(ModelError, match="spec-only"):
        big.check_trainable()


def test_an_hf_config_prices_as_the_decoder_of_its_shape(tmp_path):
    seven = model_config("llama-7b")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "max_position_embeddings": 4096}))
    hf = load_model(tmp_path)
    # the same figures, less sequence parallelism: HF layers build positions from their input
    assert hf.spec(1024).layers == model_spec(seven, 1024, sequence_parallel=False).layers
    assert not hf.spec(1024).sequence_parallel(2) and model_spec(seven, 1024).sequence_parallel(2)
    assert hf.tp_sizes() == (1, 2, 4, 8)
    with pytest.raises(PlanError, match="does not divide"):
        hf.check_tp(3)


@pytest.mark.parametrize("config_json", [LLAMA_JSON, QWEN2_JSON])
def test_hf_stages_chain_to_the_hf_model(config_json):
    pytest.importorskip("transformers")
    source = load_model(config_json)
    full = source.module(seed=0).double()
    tokens = torch.randint(0, 256, (2, 16))
    stages = [source.build_stage(a, b, seed=0).double() for a, b in ((0, 2), (2, 5), (5, 6))]
    x = tokens
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, full(tokens).logits, rtol=1e-12, atol=1e-12)
    names = [n for stage in stages for n, _ in stage.canonical_parameters()]
    hf_names = [n for n, _ in full.named_parameters()]
    # Tied: the head's copy is named as the embedding, which HF lists once.
    assert sorted(set(names)) == sorted(hf_names)
    assert len(names) == len(hf_names) + source.tie_embeddings
    assert [source.layer_of(n) for n in ("model.embed_tokens.weight",
                                         "model.layers.2.mlp.up_proj.weight",
                                         "model.norm.weight")] == [0, 3, 5]


def test_workers_rebuild_weights_from_the_path_not_a_pickled_copy():
    pytest.importorskip("transformers")
    source = load_model(LLAMA_JSON)
    source.module(seed=0)
    assert pickle.loads(pickle.dumps(source))._module is None
    given = as_model(source.module(seed=0))  # a user's module travels with the job
    assert pickle.loads(pickle.dumps(given))._module is not None


def test_a_plain_module_is_one_data_parallel_layer():
    module = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    source = as_model(module)
    assert isinstance(source, WholeModule) and source.vocab_size == 50
    assert source.spec(16).n_layers == 1
    with pytest.raises(PlanError, match="data-parallel only"):
        source.check_tp(2)


def test_plan_takes_an_hf_config_and_a_model_yaml(tmp_path):
    for model in (QWEN2_JSON, EXAMPLES / "models" / "tiny-gqa.yaml"):
        out = tmp_path / "plan.json"
        result = CliRunner().invoke(app, ["plan", "--cluster", THREE, "--model", str(model),
                                          "--global-batch", "16", "--seq-len", "32",
                                          "--out", str(out)])
        assert result.exit_code == 0, result.output
        plan = load_plan(out, None)
        assert plan.model == str(model)  # a plan names what the workers will read
        sim = CliRunner().invoke(app, ["simulate", "--cluster", THREE, "--plan", str(out)])
        assert sim.exit_code == 0, sim.output


@pytest.mark.parametrize(("name", "text", "words"), [
    ("m.yaml", "vocab_size: 256\ndim: 64\nn_layers: 2\nn_heads: 4\nffn_dim: 128\nlayers: 3\n",
     ["'layers'", "remove it"]),
    ("m.yaml", "vocab_size: 256\nn_layers: 2\nn_heads: 4\nffn_dim: 128\n", ["'dim'"]),
    ("m.yaml", "vocab_size: 256\ndim: 64\nn_layers: -2\nn_heads: 4\nffn_dim: 128\n",
     ["'n_layers'", "greater than 0"]),
    ("config.json", '{"model_type": "llama", "vocab_size": 256, "num_hidden_layers": 2, '
     '"num_attention_heads": 4, "intermediate_size": 64}', ["'hidden_size'", "missing"]),
    ("config.json", '{"vocab_size": 256}', ["'model_type'"]),
    ("config.json", '{"model_type": "llama",', ["not valid JSON"]),
])
def test_a_bad_model_file_is_one_line_exit_2(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    result = CliRunner().invoke(app, ["plan", "--cluster", THREE, "--model", str(path),
                                      "--global-batch", "8", "--seq-len", "16"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("name", ["tiny", str(EXAMPLES / "models" / "tiny-gqa.yaml")])
def test_half_layers_add_up_to_their_blocks_and_keep_their_names(name):
    """Plan.half_layers: each block priced as two units whose figures add up to the block's,
    built as two modules whose parameters keep the block's names and map to their unit."""
    source = load_model(name)
    spec = source.spec(32)
    halves = spec.halves
    assert halves.half_layers and halves.n_layers == 2 * spec.n_layers - 2
    summed = ("params", "forward_flops_per_token", "activation_elems_per_token",
              "tp_allreduces", "tp_replicated_params", "tp_replicated_elems_per_token",
              "sp_replicated_elems_per_token", "sp_gathered_elems_per_token",
              "kv_elems_per_token", "buffer_bytes")
    for i, block in enumerate(spec.layers[1:-1]):
        attn, ffn = halves.layers[1 + 2 * i], halves.layers[2 + 2 * i]
        for field in summed:
            assert getattr(attn, field) + getattr(ffn, field) == pytest.approx(
                getattr(block, field)), field
        # recomputation keeps each half's input: twice the block's
        assert attn.recompute_elems_per_token + ffn.recompute_elems_per_token \
            == 2 * block.recompute_elems_per_token
    cut = source.units(True)
    assert cut.n_layers == halves.n_layers and cut.spec(32) == halves
    assert source.units(False) is source and cut.units(True) is cut
    seen = {}
    for unit in range(cut.n_layers):
        stage = cut.build_stage(unit, unit + 1, seed=0)
        for canonical, p in stage.canonical_parameters():
            if canonical in stage.aliases.values() and unit == cut.n_layers - 1:
                continue  # the head's copy of a tied embedding: the embedding's
            assert cut.layer_of(canonical) == unit, canonical
            seen[canonical] = p.numel()
    whole = dict(source.whole(seed=0).named_parameters())
    assert seen.keys() == whole.keys()
    assert sum(seen.values()) == spec.params


def test_only_the_reference_decoder_cuts_half_layers():
    for source in (load_model(LLAMA_JSON), as_model(torch.nn.Linear(4, 4))):
        with pytest.raises(PlanError, match="half_layers"):
            source.units(True)
        assert source.units(False) is source

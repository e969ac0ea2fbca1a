"""hetrain.fit on users' own modules: a plain nn.Module and a Hugging Face Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hetrain
from hetrain.runtime import TrainConfig
from hetrain.runtime.reference import train_reference
from tests.helpers import small_corpus

pytestmark = pytest.mark.slow


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(),
                                                  nn.Linear(64, 32)) for _ in range(2))
        self.out = nn.Linear(32, 256)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def _check(model, three_kinds, steps=5):
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = hetrain.fit(model, small_corpus(), cluster=three_kinds, steps=steps,
                         global_batch=12, seq_len=16, precision="float64", time_scale=1e-9)
    # At this size the cost model leaves the slowest kind idle (one micro-batch there would
    # end the step later), so at least two kinds share the batch, unevenly.
    assert len(result.plan.kinds()) >= 2
    assert len({result.plan.samples_of(g.name) for g in result.plan.stage_groups}) > 1
    fresh = type(model)(model.config) if hasattr(model, "config") else type(model)()
    fresh.load_state_dict(start)
    config = TrainConfig(steps=steps, precision="float64")
    ref, _ = train_reference(config, small_corpus(), 12, 16, model=fresh)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref[name], rtol=1e-5, atol=1e-7)


def test_fit_plain_module_equals_one_device(three_kinds):
    torch.manual_seed(0)
    _check(TinyLM().double(), three_kinds)


def test_fit_transformers_llama_equals_one_device(three_kinds):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    _check(model, three_kinds)

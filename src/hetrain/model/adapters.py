"""User models: a ModelSpec for any nn.Module (trained data-parallel as one stage)."""

from __future__ import annotations

from torch import nn

from hetrain.model.spec import LayerSpec, ModelSpec


def module_spec(model: nn.Module, seq_len: int, name: str = "user-model") -> ModelSpec:
    """One layer holding the whole model: 2 FLOPs per weight per token forward (dense
    matmuls dominate), activations estimated from the hidden size when it can be found."""
    params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    dim = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "dim", 0) or 0)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 1)
    acts = float(layers * 16 * dim + 2 * vocab) if dim else float(params) / 1000
    layer = LayerSpec(name="model", params=params, forward_flops_per_token=2.0 * params,
                      activation_elems_per_token=acts, recompute_elems_per_token=acts,
                      output_elems_per_token=0.0)
    return ModelSpec(name=name, seq_len=seq_len, dim=dim, vocab_size=vocab,
                     tie_embeddings=False, layers=[layer])

"""ModelSpec: per layer parameters, FLOPs and activation sizes per token; what the cost model reads.

Counts are in elements, not bytes: the dtype is chosen per stage group by the plan.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from hetrain.model.config import ModelConfig


class LayerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # "embed", "block.3", "head"
    params: int
    forward_flops_per_token: float  # backward costs twice this
    activation_elems_per_token: float  # kept for backward, no recomputation
    recompute_elems_per_token: float  # kept with full recomputation (the layer input)
    output_elems_per_token: float  # sent to the next stage
    tp_allreduces: int = 0  # all-reduces of the output per forward under tensor parallelism


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    seq_len: int
    dim: int
    vocab_size: int
    tie_embeddings: bool
    layers: list[LayerSpec]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> int:
        total = sum(layer.params for layer in self.layers)
        if self.tie_embeddings:
            total -= self.vocab_size * self.dim
        return total

    def flops_per_token(self, start: int = 0, end: int | None = None) -> float:
        """Forward + backward FLOPs per token of layers [start, end)."""
        return 3 * sum(layer.forward_flops_per_token for layer in self.layers[start:end])

    def range_params(self, start: int, end: int) -> int:
        return sum(layer.params for layer in self.layers[start:end])


def model_spec(cfg: ModelConfig, seq_len: int) -> ModelSpec:
    h, f, kv = cfg.dim, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    q = cfg.n_heads * cfg.head_dim
    block_params = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
    # Matmuls: 2 FLOPs per weight per token; causal attention: QK^T and AV over seq/2 keys.
    block_flops = 2 * (block_params - 2 * h) + 2 * 2 * q * seq_len / 2
    # Inputs of each matmul, norm and activation kept for backward (flash attention: no s^2).
    block_acts = 5 * h + q + 2 * kv + 4 * f
    layers = [
        LayerSpec(name="embed", params=cfg.vocab_size * h, forward_flops_per_token=0.0,
                  activation_elems_per_token=0.0, recompute_elems_per_token=0.0,
                  output_elems_per_token=h),
        *(
            LayerSpec(name=f"block.{i}", params=block_params, forward_flops_per_token=block_flops,
                      activation_elems_per_token=block_acts, recompute_elems_per_token=h,
                      output_elems_per_token=h, tp_allreduces=2)
            for i in range(cfg.n_layers)
        ),
        LayerSpec(name="head", params=cfg.vocab_size * h + h,
                  forward_flops_per_token=2.0 * h * cfg.vocab_size,
                  activation_elems_per_token=2 * h + 2 * cfg.vocab_size,
                  recompute_elems_per_token=h + 2 * cfg.vocab_size, output_elems_per_token=0.0),
    ]
    return ModelSpec(name=cfg.name, seq_len=seq_len, dim=h, vocab_size=cfg.vocab_size,
                     tie_embeddings=cfg.tie_embeddings, layers=layers)

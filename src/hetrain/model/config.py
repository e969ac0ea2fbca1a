"""Named model sizes: small ones to train here, spec-only large ones for the planner."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hetrain.errors import ModelError


class ModelConfig(BaseModel):
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = None
    ffn_dim: int = Field(gt=0)
    head_dim: int = Field(default=0, ge=0, description="0: dim // n_heads")
    max_seq_len: int = Field(default=2048, gt=0)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    trainable: bool = Field(default=True, description="False: too big to build here, spec only")

    @model_validator(mode="before")
    @classmethod
    def _default_head_dim(cls, data: Any) -> Any:
        # Most models split the hidden size over the heads; some (Qwen3, Gemma) set it apart.
        if isinstance(data, dict) and not data.get("head_dim"):
            dim, heads = data.get("dim"), data.get("n_heads")
            if isinstance(dim, int) and isinstance(heads, int) and heads > 0:
                if dim % heads:
                    raise ValueError(f"dim {dim} is not divisible by n_heads {heads}; set "
                                     "head_dim")
                data = {**data, "head_dim": dim // heads}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


# fmt: off
MODELS: dict[str, ModelConfig] = {c.name: c for c in (
    ModelConfig(name="tiny", vocab_size=256, dim=64, n_layers=4, n_heads=4, ffn_dim=176,
                max_seq_len=256),
    ModelConfig(name="tiny-tied", vocab_size=256, dim=64, n_layers=4, n_heads=4, ffn_dim=176,
                max_seq_len=256, tie_embeddings=True),
    ModelConfig(name="small", vocab_size=256, dim=256, n_layers=8, n_heads=8, n_kv_heads=4,
                ffn_dim=688, max_seq_len=512),
    ModelConfig(name="llama-7b", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                ffn_dim=11008, max_seq_len=4096, trainable=False),
    ModelConfig(name="llama-13b", vocab_size=32000, dim=5120, n_layers=40, n_heads=40,
                ffn_dim=13824, max_seq_len=4096, trainable=False),
    ModelConfig(name="llama-70b", vocab_size=32000, dim=8192, n_layers=80, n_heads=64,
                n_kv_heads=8, ffn_dim=28672, max_seq_len=4096, trainable=False),
    ModelConfig(name="llama-405b", vocab_size=128256, dim=16384, n_layers=126, n_heads=128,
                n_kv_heads=8, ffn_dim=53248, max_seq_len=8192, trainable=False),
)}
# fmt: on


def model_config(name: str) -> ModelConfig:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; use one of {', '.join(MODELS)}"
        ) from None

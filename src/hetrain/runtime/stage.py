"""A worker's share of the model: a contiguous range of layers, tensor-parallel if its stage
group has more than one device. Parameters keep canonical (full-model) names, so gradients of
the same weight meet across stage groups, tied embeddings included."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from hetrain.errors import PlanError
from hetrain.model.decoder import Block, Decoder


class Stage(nn.Module):
    """Layers [start, end) of a layered model; `first`/`last` say who feeds tokens and who
    computes the loss."""

    def __init__(self, layers: list[nn.Module], prefixes: list[str], start: int, end: int,
                 n_layers: int, aliases: dict[str, str] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prefixes = prefixes
        self.start, self.end = start, end
        self.first, self.last = start == 0, end == n_layers
        self.aliases = aliases or {}

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Layers from the `start`-th of the stage on (zero-bubble splits stage 0 after its
        embedding)."""
        for layer in self.layers[start:]:
            x = layer(x)
        return x

    def canonical_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full-model name, parameter), each parameter once."""
        seen: set[int] = set()
        for layer, prefix in zip(self.layers, self.prefixes, strict=True):
            for name, p in layer.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                full = prefix + name
                yield self.aliases.get(full, full), p


class WholeModel(nn.Module):
    """A user's model as one stage (data parallelism): tokens in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.first = self.last = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(tokens)
        return getattr(out, "logits", out)

    def canonical_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.model.named_parameters()


def decoder_stage(model: Decoder, start: int, end: int) -> Stage:
    layers = model.layers()
    aliases = {"head.out.weight": "embed.tok.weight"} if model.cfg.tie_embeddings else {}
    return Stage(layers[start:end], model.layer_prefixes()[start:end], start, end, len(layers),
                 aliases)


def apply_tensor_parallel(stage: Stage, mesh) -> None:
    """Megatron-style TP on every block: q/k/v and w1/w3 column-wise, wo and w2 row-wise.
    Embedding, norms and head stay replicated across the group."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = mesh.size()
    for layer in stage.layers:
        if not isinstance(layer, Block):
            continue
        kv_out = layer.attn.wk.out_features
        if (layer.attn.wq.out_features // layer.attn.head_dim) % tp or \
                (kv_out // layer.attn.head_dim) % tp or layer.ffn.w1.out_features % tp:
            raise PlanError(f"tensor parallelism of {tp} does not divide the model's heads / "
                            "kv heads / ffn width; use a TP degree that does")
        parallelize_module(layer, mesh, {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
            "ffn.w1": ColwiseParallel(), "ffn.w3": ColwiseParallel(),
            "ffn.w2": RowwiseParallel(),
        })


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (a DTensor's local part; a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathers a DTensor over its mesh: a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

"""A worker's share of the model (a Stage, built by the model object: hetrain.model.source)
and the tensor helpers for tensor-parallel shards."""

from __future__ import annotations

import torch

from hetrain.model.stage import Stage

__all__ = ["Stage", "full_tensor", "local_tensor", "settle_partial_grads"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (a DTensor's local part; a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathers a DTensor over its mesh: a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def settle_partial_grads(params) -> None:  # noqa: ANN001 - parameters
    """Sum the gradients tensor parallelism left partial over the TP group (the norms'
    weights under sequence parallelism: each rank saw its share of the sequence), so every
    rank holds the whole gradient of a replicated weight. Collectives on the TP group, in
    parameter order: every rank of the group calls this at the same point of its step."""
    for p in params:
        g = p.grad
        if g is not None and hasattr(g, "placements") and \
                any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)

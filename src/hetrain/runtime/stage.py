"""A worker's share of the model (a Stage, built by the model object: hetrain.model.source)
and the tensor helpers for tensor-parallel shards."""

from __future__ import annotations

import torch

from hetrain.model.stage import Stage

__all__ = ["Stage", "full_tensor", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (a DTensor's local part; a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathers a DTensor over its mesh: a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

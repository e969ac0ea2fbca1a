"""Cost model: compute, transfer and memory estimates per kind, from specs or a profile."""

from hetrain.cost.model import DTYPE_BYTES, CostModel

__all__ = ["DTYPE_BYTES", "CostModel"]

"""Cost model: compute, transfer and memory estimates per kind, from specs or a profile."""

from hetrain.cost.model import DTYPE_BYTES, CostModel, ring_allreduce_s
from hetrain.cost.profile import Profile

__all__ = ["DTYPE_BYTES", "CostModel", "Profile", "ring_allreduce_s"]

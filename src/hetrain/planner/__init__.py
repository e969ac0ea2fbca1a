"""Planner: search for the fastest memory-feasible plan, and baseline plans."""

from hetrain.planner.data_parallel import (
    balanced_shares,
    data_parallel_plan,
    proportional_shares,
)

__all__ = ["balanced_shares", "data_parallel_plan", "proportional_shares"]

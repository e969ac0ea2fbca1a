"""Planner: search for the fastest memory-feasible plan, and baseline plans."""

from hetrain.planner.data_parallel import data_parallel_plan, proportional_shares

__all__ = ["data_parallel_plan", "proportional_shares"]

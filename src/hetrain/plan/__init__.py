"""Plans: stage groups and routes, shorthands, validation, and the shared 1F1B schedule."""

from hetrain.plan.expand import expand_plan
from hetrain.plan.io import atomic_write_text, read_plan_dict
from hetrain.plan.schedule import Action, Schedule, build_schedule
from hetrain.plan.types import MicroBatch, Plan, Route, StageGroup
from hetrain.plan.validate import check_memory, validate_plan

__all__ = ["Action", "MicroBatch", "Plan", "Route", "Schedule", "StageGroup", "atomic_write_text",
           "build_schedule", "check_memory", "expand_plan", "load_plan", "read_plan_dict",
           "validate_plan"]


def load_plan(path, cluster) -> Plan:
    """Read a plan file (general form or shorthand) and expand it against the cluster."""
    return expand_plan(read_plan_dict(path), cluster, str(path))

"""Re-planning after a lost device: a plan for the survivors with the same global batch, so
every optimizer step stays the same step (runtime.recovery calls it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.model.loading import load_model
from hetrain.model.source import ModelSource
from hetrain.plan.types import Plan
from hetrain.planner.data_parallel import data_parallel_plan


def data_parallel_replan(model: ModelSource | None = None
                         ) -> Callable[[Cluster, Plan, Any], Plan]:
    """Speed-balanced data parallelism on the survivors. Every survivor then holds the whole
    model; for models that do not fit one device, re-plan with planner.search instead."""

    def replan(survivors: Cluster, plan: Plan, config: Any) -> Plan:
        spec = (model or load_model(plan.model)).spec(plan.seq_len)
        return data_parallel_plan(survivors, CostModel(survivors, spec), plan.global_batch)

    return replan

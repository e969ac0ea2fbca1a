"""Re-planning after a lost device: a plan for the survivors with the same global batch, so
every optimizer step stays the same step (runtime.recovery calls it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.model.adapters import module_spec
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan.types import Plan
from hetrain.planner.data_parallel import data_parallel_plan


def data_parallel_replan(user_model: nn.Module | None = None
                         ) -> Callable[[Cluster, Plan, Any], Plan]:
    """Speed-balanced data parallelism on the survivors. Every survivor then holds the whole
    model; for models that do not fit one device, re-plan with planner.search instead."""

    def replan(survivors: Cluster, plan: Plan, config: Any) -> Plan:
        spec = module_spec(user_model, plan.seq_len, plan.model) if user_model is not None \
            else model_spec(model_config(plan.model), plan.seq_len)
        return data_parallel_plan(survivors, CostModel(survivors, spec), plan.global_batch)

    return replan

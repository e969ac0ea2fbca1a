"""Runtime: workers that execute any valid plan exactly, on torch.distributed."""

from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import check_plan, train
from hetrain.runtime.recovery import ResilientResult, train_resilient
from hetrain.runtime.results import RunResult

__all__ = ["ResilientResult", "RunResult", "TrainConfig", "check_plan", "train",
           "train_resilient"]

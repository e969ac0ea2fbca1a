"""Runtime: workers that execute any valid plan exactly, on torch.distributed."""

from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import check_plan, train
from hetrain.runtime.results import RunResult

__all__ = ["RunResult", "TrainConfig", "check_plan", "train"]

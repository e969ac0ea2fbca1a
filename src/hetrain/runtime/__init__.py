"""Runtime: workers that execute any valid plan exactly, on torch.distributed."""

from hetrain.runtime.config import TrainConfig
from hetrain.runtime.entry import RunHooks, run_training, train_resilient
from hetrain.runtime.launch import check_plan, train
from hetrain.runtime.results import RunResult

__all__ = ["RunHooks", "RunResult", "TrainConfig", "check_plan", "run_training", "train",
           "train_resilient"]

"""The job description every worker receives: cluster, plan, settings, and where to write."""

from __future__ import annotations

from dataclasses import dataclass, field

from hetrain.cluster.topology import Cluster
from hetrain.data.corpus import Corpus
from hetrain.model.source import ModelSource
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.faults import Faults


@dataclass
class Job:
    """Everything a worker needs; pickled to each spawned process."""

    cluster: Cluster
    plan: Plan
    config: TrainConfig
    out_dir: str
    time_scale: float
    emulated: set[str]
    torch_device_of: dict[str, str] = field(default_factory=dict)  # device id -> "cuda:0"
    model: ModelSource | None = None  # None: the plan's model by name or path (load_model)
    corpus: Corpus | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    progress: object | None = None  # multiprocessing queue: rank 0 puts each StepRecord
    faults: Faults | None = None  # tests only: None in every production run

    @property
    def rank_devices(self) -> list[str]:
        return self.plan.devices()

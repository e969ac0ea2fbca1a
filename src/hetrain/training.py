"""A training job from its sections to its result, for `hetrain train` and `hetrain.fit`.

`plan_job` loads the cluster and makes the plan: the job's plan file, else the planner's
search for the model and cluster (data parallelism when the search finds nothing runnable,
with the reason in one line, or for a user's own module, which runs whole on each device).
`run_job` saves the plan beside the run and hands everything to the runtime's one entry point
(runtime/entry.py), which checks every input before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from hetrain.cluster.loading import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus
from hetrain.errors import ConfigError, HetrainError
from hetrain.model.loading import as_model, load_model
from hetrain.model.source import ModelSource
from hetrain.plan import load_plan
from hetrain.plan.types import Plan
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.planner.estimate import StepEstimate
from hetrain.planner.options import model_options
from hetrain.planner.replan import data_parallel_replan
from hetrain.planner.search import search_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.entry import RunHooks, run_training
from hetrain.runtime.faults import Faults
from hetrain.runtime.job_config import JobConfig
from hetrain.runtime.launch import check_plan, plan_spec
from hetrain.runtime.preflight import check_batch, check_seq_len, option_name
from hetrain.runtime.results import RunResult

PLAN_FILE = "plan.json"  # the plan a run trained, in its checkpoint folder or --out-dir
PlanSource = Literal["file", "search", "data_parallel"]


@dataclass
class PlannedJob:
    """A job with its cluster, its plan and where the plan came from."""

    job: JobConfig
    cluster: Cluster
    plan: Plan
    config: TrainConfig
    source: PlanSource
    estimate: StepEstimate | None = None  # the planner's prediction (searched plans)
    search_s: float | None = None
    note: str | None = None  # why the search's plan is not the one trained, one line

    def cost_model(self, model: ModelSource | nn.Module | None = None) -> CostModel:
        """The costs the plan is priced with (for its table)."""
        return CostModel(self.cluster, plan_spec(self.plan, model))

    @property
    def plan_path(self) -> Path | None:
        """Where the plan is saved beside the run (None: the run keeps no folder)."""
        folder = self.job.checkpoint.dir or self.job.logging.out_dir
        return Path(folder) / PLAN_FILE if folder else None


def plan_job(job: JobConfig, *, cluster: Cluster | None = None,
             model: ModelSource | nn.Module | None = None, plan: Plan | None = None,
             cli: bool = False) -> PlannedJob:
    """The job's cluster and plan (`plan`, else the job's plan file, else planned); errors
    name the flag (`cli`) or the section.field. A user's module (`model`) without a plan
    trains data-parallel, as hetrain.fit always has."""
    config = job.train_config()
    if cluster is None:
        if not job.cluster.path:
            raise ConfigError(f"{option_name('cluster', cli) if cli else 'cluster'}: give the "
                              "cluster YAML (or path in the job file's [cluster] section)")
        cluster = load_cluster(job.cluster.path)
    if plan is not None or job.plan.path:
        plan = plan if plan is not None else load_plan(job.plan.path, cluster)
        config = config.model_copy(update={"model": plan.model})
        return PlannedJob(job, cluster, plan, config, "file")
    gb, seq_len = job.plan.global_batch, job.plan.seq_len
    check_batch(gb, seq_len, cli=cli)
    source = as_model(model) if model is not None else load_model(config.model)
    source.check_trainable()  # before the planner prices it
    check_seq_len(source, seq_len, cli)
    cost = CostModel(cluster, source.spec(seq_len))
    dp = PlannedJob(job, cluster, data_parallel_plan(cluster, cost, gb), config,
                    "data_parallel")
    if model is not None or not job.plan.search:
        return dp
    try:
        result = search_plan(cluster, cost, gb, model_options(source))
        check_plan(result.plan, cluster, cost.spec)  # what the runtime will accept
    except HetrainError as err:
        dp.note = f"planner: {err}; training data parallelism instead"
        return dp
    return PlannedJob(job, cluster, result.plan, config, "search", result.estimate,
                      result.search_s)


def run_job(planned: PlannedJob, *, model: ModelSource | nn.Module | None = None,
            corpus: Corpus | None = None, hooks: RunHooks | None = None, cli: bool = False,
            faults: Faults | None = None) -> RunResult | None:
    """Train the planned job (runtime.entry.run_training); the plan is saved beside the run
    once every check passed, before any worker starts."""
    hooks = hooks or RunHooks()
    logging = planned.job.logging
    outputs = [(logging.json_file, option_name("json", cli) if cli else "logging.json_file"),
               (logging.trace_file, option_name("trace", cli) if cli else "logging.trace_file")]
    return run_training(
        planned.cluster, planned.plan, planned.config, replan=data_parallel_replan(),
        model=model, corpus=corpus, out_dir=logging.out_dir,
        hooks=RunHooks(_then(lambda: _save_plan(planned), hooks.on_start), hooks.progress,
                       hooks.on_suspect),
        outputs=outputs, cli=cli, faults=faults)


def _save_plan(planned: PlannedJob) -> None:
    path = planned.plan_path
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        planned.plan.save(path)


def _then(first: Callable[[], None], second: Callable[[], None] | None) -> Callable[[], None]:
    def both() -> None:
        first()
        if second is not None:
            second()

    return both

"""The Python API: `hetrain.fit(model, data, cluster=..., plan=...)` trains a user's own
nn.Module: a Hugging Face causal LM under any plan, any other module data-parallel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetrain.cluster.loading import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.data.corpus import Corpus
from hetrain.data.loading import load_corpus
from hetrain.errors import ClusterError, ConfigError, DataError, ModelError, RuntimeFailure
from hetrain.model.loading import as_model
from hetrain.plan.types import Plan
from hetrain.runtime.job_config import JobConfig, job_from_dict, load_job
from hetrain.runtime.results import RunResult
from hetrain.training import plan_job, run_job

# fit's keywords and their place in the job's sections.
KEYWORDS = {"steps": "schedule.steps", "seed": "schedule.seed",
            "precision": "schedule.precision", "global_batch": "plan.global_batch",
            "seq_len": "plan.seq_len", "lr": "optimizer.lr",
            "weight_decay": "optimizer.weight_decay", "time_scale": "cluster.time_scale",
            "warmup_steps": "optimizer.warmup_steps", "lr_schedule": "optimizer.lr_schedule",
            "min_lr": "optimizer.min_lr", "grad_clip": "optimizer.grad_clip"}


def _as_corpus(data: Corpus | torch.Tensor | str | Path | None, seed: int) -> Corpus:
    if isinstance(data, Corpus):
        return data
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
            raise DataError(f"data: a tensor of integer token ids is needed, not {data.dtype}")
        return Corpus(data.long().flatten(), "tensor", seed)
    if data is None or isinstance(data, str | Path):
        return load_corpus(data, seed)
    raise DataError(f"data must be a Corpus, a tensor of token ids or a text path, not "
                    f"{type(data).__name__}")


def _as_cluster(cluster: Cluster | str | Path) -> Cluster:
    if isinstance(cluster, Cluster):
        return cluster
    if isinstance(cluster, str | Path):
        return load_cluster(cluster)
    raise ClusterError(f"cluster must be a Cluster or the path of a cluster YAML, not "
                       f"{type(cluster).__name__}")


def _as_job(job: JobConfig | dict | str | Path | None) -> JobConfig:
    if job is None or isinstance(job, JobConfig):
        return job or JobConfig()
    if isinstance(job, dict):
        return job_from_dict(job, "job")
    if isinstance(job, str | Path):
        return load_job(job)
    raise ConfigError(f"job must be a JobConfig, a dict of sections or a job file, not "
                      f"{type(job).__name__}")


def fit(model: nn.Module, data: Corpus | torch.Tensor | str | Path | None = None, *,
        cluster: Cluster | str | Path | None = None,
        job: JobConfig | dict | str | Path | None = None, steps: int | None = None,
        global_batch: int | None = None, seq_len: int | None = None, lr: float | None = None,
        weight_decay: float | None = None, seed: int | None = None,
        precision: str | None = None, time_scale: float | None = None,
        warmup_steps: int | None = None, lr_schedule: str | None = None,
        min_lr: float | None = None, grad_clip: float | None = None,
        plan: Plan | str | Path | dict[str, Any] | None = None,
        **sections: dict[str, Any]) -> RunResult:
    """Train `model` (tokens [batch, seq] -> logits, or an output with `.logits`, as
    Hugging Face causal LMs return) on the devices of `cluster`. Without a plan: every
    device, data-parallel with shares balanced by each kind's speed. With `plan` (a Plan or
    a plan file; its global batch and seq_len apply): any plan form for a Hugging Face causal
    LM (pipelines cut at its decoder layers, TP groups), data parallelism for other modules.
    Each step equals one-device training on the same global batch. The trained weights are
    copied back into `model` (`model.save_pretrained(folder)` then writes them for HF).
    The recipe: AdamW (decay on matrices only), `warmup_steps` of linear warm-up, then a
    constant or cosine `lr_schedule` down to `min_lr`; `grad_clip` bounds the global
    gradient norm (runtime/recipe.py).

    The job's settings come in the sections of a job file (`job`: a JobConfig, a dict of
    sections or the path of a TOML/YAML file), then section keywords (e.g.
    `optimizer={"lr": 3e-4}`, `checkpoint={"dir": "runs/a", "every": 10}`), then the flat
    keywords above; a keyword left at None keeps the job's value (or its default).

    Every input is checked before a worker starts: a bad one raises the part's error
    (ConfigError, ClusterError, DataError, ModelError, PlanError), a HetrainError."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch nn.Module, not {type(model).__name__}")
    source = as_model(model)
    plan_obj = plan if isinstance(plan, Plan) else None
    if isinstance(plan, str | Path):
        sections["plan"] = {**sections.get("plan", {}), "path": str(plan)}
    elif isinstance(plan, dict):
        sections["plan"] = plan
    spec = _as_job(job)
    unknown = set(sections) - set(JobConfig.model_fields)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown keyword; the sections are "
                          f"{', '.join(JobConfig.model_fields)}")
    values: dict[str, Any] = {"model.name": source.name}
    for section, body in sections.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: a dict of the section's fields, not "
                              f"{type(body).__name__}")
        values.update({f"{section}.{field}": value for field, value in body.items()})
    flat = {"steps": steps, "seed": seed, "precision": precision, "global_batch": global_batch,
            "seq_len": seq_len, "lr": lr, "weight_decay": weight_decay,
            "time_scale": time_scale, "warmup_steps": warmup_steps,
            "lr_schedule": lr_schedule, "min_lr": min_lr, "grad_clip": grad_clip}
    values.update({KEYWORDS[k]: v for k, v in flat.items() if v is not None})
    spec = spec.with_values(values, {v: k for k, v in KEYWORDS.items()})
    if cluster is None and spec.cluster.path is None:
        raise ClusterError("cluster: give a Cluster or the path of a cluster YAML")
    clus = _as_cluster(cluster if cluster is not None else spec.cluster.path)
    corpus = _as_corpus(data if data is not None else spec.data.path, spec.schedule.seed)
    planned = plan_job(spec, cluster=clus, model=source, plan=plan_obj)
    result = run_job(planned, model=source, corpus=corpus)
    if result is None:  # a torchrun rank: the job's weights are in its checkpoints
        raise RuntimeFailure("hetrain.fit does not run under torchrun; use `hetrain train`")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(result.params[name].to(p.dtype))
    return result

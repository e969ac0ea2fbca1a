"""The Python API: `hetrain.fit(model, data, cluster=..., plan=...)` trains a user's own
nn.Module: a Hugging Face causal LM under any plan, any other module data-parallel."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hetrain.cluster.loading import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus, load_corpus
from hetrain.errors import ClusterError, DataError, ModelError
from hetrain.model.loading import as_model
from hetrain.plan import load_plan
from hetrain.plan.types import Plan
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.runtime.launch import train
from hetrain.runtime.preflight import check_batch, train_config
from hetrain.runtime.results import RunResult


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


def fit(model: nn.Module, data: Corpus | torch.Tensor | str | Path | None = None, *,
        cluster: Cluster | str | Path, steps: int = 20, global_batch: int = 48,
        seq_len: int = 64, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
        precision: str = "float32", time_scale: float | None = None,
        plan: Plan | str | Path | None = None) -> RunResult:
    """Train `model` (tokens [batch, seq] -> logits, or an output with `.logits`, as
    Hugging Face causal LMs return) on the devices of `cluster`. Without `plan`: every
    device, data-parallel with shares balanced by each kind's speed. With `plan` (a Plan or
    a plan file; its global batch and seq_len apply): any plan form for a Hugging Face causal
    LM (pipelines cut at its decoder layers, TP groups), data parallelism for other modules.
    Each step equals one-device training on the same global batch. The trained weights are
    copied back into `model` (`model.save_pretrained(folder)` then writes them for HF).

    Every input is checked before a worker starts: a bad one raises the part's error
    (ConfigError, ClusterError, DataError, ModelError, PlanError), a HetrainError."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch nn.Module, not {type(model).__name__}")
    source = as_model(model)
    config = train_config(model=source.name, steps=steps, lr=lr,
                          weight_decay=weight_decay, seed=seed, precision=precision,
                          time_scale=time_scale)
    c = _as_cluster(cluster)
    if plan is None:
        check_batch(global_batch, seq_len, cli=False)
        plan = data_parallel_plan(c, CostModel(c, source.spec(seq_len)), global_batch)
    elif not isinstance(plan, Plan):
        plan = load_plan(plan, c)
    corpus = _as_corpus(data, seed)
    result = train(c, plan, config.model_copy(update={"model": plan.model}), model=source,
                   corpus=corpus)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(result.params[name].to(p.dtype))
    return result

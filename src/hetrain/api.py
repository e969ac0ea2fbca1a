"""The Python API: `hetrain.fit(model, data, cluster=...)` trains a user's own nn.Module."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hetrain.cluster.loading import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus, load_corpus
from hetrain.errors import ClusterError, DataError, ModelError
from hetrain.model.adapters import module_spec
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
        warmup_steps: int = 0, lr_schedule: str = "constant", min_lr: float = 0.0,
        grad_clip: float | None = None) -> RunResult:
    """Train `model` (tokens [batch, seq] -> logits, or an output with `.logits`, as
    Hugging Face causal LMs return) on every device of `cluster`, data-parallel with shares
    balanced by each kind's speed. Each step equals one-device training on the same global
    batch. The trained weights are copied back into `model`. The recipe: AdamW (decay on
    matrices only), `warmup_steps` of linear warm-up, then a constant or cosine `lr_schedule`
    down to `min_lr`; `grad_clip` bounds the global gradient norm (runtime/recipe.py).

    Every input is checked before a worker starts: a bad one raises the part's error
    (ConfigError, ClusterError, DataError, ModelError, PlanError), a HetrainError."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch nn.Module, not {type(model).__name__}")
    config = train_config(model=type(model).__name__, steps=steps, lr=lr,
                          weight_decay=weight_decay, seed=seed, precision=precision,
                          time_scale=time_scale, warmup_steps=warmup_steps,
                          lr_schedule=lr_schedule, min_lr=min_lr, grad_clip=grad_clip)
    check_batch(global_batch, seq_len, cli=False)
    c = _as_cluster(cluster)
    corpus = _as_corpus(data, seed)
    spec = module_spec(model, seq_len, type(model).__name__)
    plan = data_parallel_plan(c, CostModel(c, spec), global_batch)
    result = train(c, plan, config.model_copy(update={"model": plan.model}), user_model=model,
                   corpus=corpus)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(result.params[name].to(p.dtype))
    return result

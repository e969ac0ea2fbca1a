"""Single-process training on the same global batches: the yardstick of exactness."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetrain.data.corpus import Corpus
from hetrain.model.loading import as_model, load_model
from hetrain.model.source import ModelSource
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.recipe import adamw, decays, lr_at, set_lr


def train_reference(config: TrainConfig, corpus: Corpus, global_batch: int, seq_len: int,
                    model: ModelSource | nn.Module | None = None,
                    start_params: dict | None = None,
                    first_step: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Parameters (by full-model name) and losses after `config.steps` AdamW steps on the
    whole global batch at once, mean cross-entropy over all tokens, with the config's recipe
    (learning-rate schedule, decay on matrices only, global-norm clipping). `model`: the
    model object (or a user's module); default, the one `config.model` names."""
    source = load_model(config.model) if model is None else as_model(model)
    whole = source.whole(config.seed)
    named = dict(whole.named_parameters())
    whole.to(getattr(torch, config.precision))
    if start_params is not None:
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(start_params[name])
    opt = adamw(config, [(p, decays(p)) for p in named.values()])
    losses = []
    for step in range(first_step, config.steps):
        set_lr([opt], lr_at(config, step))
        inputs, targets = corpus.global_batch(step, global_batch, seq_len)
        out = whole(inputs)
        logits = getattr(out, "logits", out)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(named.values()), config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {name: p.detach().clone() for name, p in named.items()}, losses

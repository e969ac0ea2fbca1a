"""Single-process training on the same global batches: the yardstick of exactness."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetrain.data.corpus import Corpus
from hetrain.model.config import model_config
from hetrain.model.decoder import build_decoder
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.precision import param_dtype
from hetrain.runtime.stage import WholeModel


def train_reference(config: TrainConfig, corpus: Corpus, global_batch: int, seq_len: int,
                    user_model: nn.Module | None = None, start_params: dict | None = None,
                    first_step: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Parameters (by full-model name) and losses after `config.steps` AdamW steps on the
    whole global batch at once, mean cross-entropy over all tokens."""
    if user_model is not None:
        model: nn.Module = WholeModel(user_model)
        named = dict(user_model.named_parameters())
    else:
        model = build_decoder(model_config(config.model), config.seed)
        named = dict(model.named_parameters())
    model.to(param_dtype(config.precision))
    if start_params is not None:
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(start_params[name])
    opt = torch.optim.AdamW(list(named.values()), lr=config.lr,
                            weight_decay=config.weight_decay, foreach=False)
    losses = []
    for step in range(first_step, config.steps):
        inputs, targets = corpus.global_batch(step, global_batch, seq_len)
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {name: p.detach().clone() for name, p in named.items()}, losses

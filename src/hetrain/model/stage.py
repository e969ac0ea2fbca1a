"""A stage: a contiguous range [start, end) of a model's layers, as one nn.Module.

Parameters keep canonical (full-model) names, so gradients of the same weight meet across
stage groups, tied embeddings included (the head's copy is named as the embedding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Stage(nn.Module):
    """Layers [start, end) of a layered model; `first`/`last` say who feeds tokens and who
    computes the loss. A layer may return a model output holding `.logits` (a whole Hugging
    Face model as one layer): the stage passes the logits on."""

    def __init__(self, layers: list[nn.Module], prefixes: list[str], start: int, end: int,
                 n_layers: int, aliases: dict[str, str] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prefixes = prefixes
        self.start, self.end = start, end
        self.first, self.last = start == 0, end == n_layers
        self.aliases = aliases or {}
        # Full recomputation (the plan's `recompute`): each layer keeps only its input for
        # backward and runs its forward again there (torch.utils.checkpoint, non-reentrant,
        # the RNG state restored: the same values, so training stays exact).
        self.recompute = False
        # Under sequence parallelism (StageGroup.regather): the matmuls' all-gathered input
        # is saved as this rank's shard and gathered again in backward.
        self.regather = False
        # Set by the runtime around a split backward's input-gradient action: regathered
        # inputs are then not gathered (only the weight gradients read their values).
        self.input_grad_pass = False
        self._piece_takers: list[nn.Module] | None = None  # layers that read SequencePieces

    @contextmanager
    def sequence_piece(self, pieces: object) -> Iterator[None]:
        """Run the stage on one piece of a micro-batch's sequence (Plan.seq_chunks): every
        attention layer that takes pieces (model.decoder.SequencePieces) reads the earlier
        pieces' keys and values from `pieces` meanwhile."""
        if self._piece_takers is None:  # listed once: every action of a step comes here
            self._piece_takers = [m for m in self.modules() if hasattr(m, "pieces")]
        takers = self._piece_takers
        for m in takers:
            m.pieces = pieces
        try:
            yield
        finally:
            for m in takers:
                m.pieces = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.recompute else layer(x)
            x = getattr(x, "logits", x)
        return x

    def canonical_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full-model name, parameter), each parameter once."""
        seen: set[int] = set()
        for layer, prefix in zip(self.layers, self.prefixes, strict=True):
            for name, p in layer.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                full = prefix + name
                yield self.aliases.get(full, full), p

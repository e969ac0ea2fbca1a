"""The training recipe, read in one place: AdamW with weight decay on matrices only, the
learning rate of each step (linear warm-up, then constant or cosine decay to `min_lr`),
global gradient-norm clipping, and each worker's random seed for a step.

The global norm is the one a single process would compute: every element of every weight
counted once. After the gradient sync each element of a shared weight's flat bucket is owned
by exactly one member (comm.sharded.FlatLayout.zero_pieces, with or without ZeRO-1), which
adds its square; a weight held by one stage group is counted by its own ranks (a TP shard by
its holder, a replicated tensor by TP rank 0). One all-reduce of the partial sums gives the
norm. With clipping off it rides on the step's loss all-reduce (no extra collective, and the
ZeRO-1 comm thread steps each bucket as soon as it is summed); with clipping on every
optimizer, ZeRO-1 pieces included, waits for the norm (runtime/grad_sync.py defers them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from hetrain.runtime.config import TrainConfig

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + eps)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of 0-based `step`: warm-up reaches `lr` at its last step; cosine then
    decays from `lr` towards `min_lr`, reached after the run's last step (`steps`)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def decays(p: torch.Tensor) -> bool:
    """Weight decay on matrices (linear weights, embeddings), none on 1-D norms and biases."""
    return p.ndim >= 2


def adamw(config: TrainConfig, params: Iterable[tuple[torch.Tensor, bool]]
          ) -> torch.optim.AdamW:
    """AdamW over (tensor, decays) pairs: two parameter groups, decayed and not."""
    params = list(params)
    groups = [{"params": [t for t, d in params if d], "weight_decay": config.weight_decay},
              {"params": [t for t, d in params if not d], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] or [{"params": []}]
    return torch.optim.AdamW(groups, lr=lr_at(config, 0), foreach=False)


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def clip_coefficient(config: TrainConfig, norm: float) -> float:
    """Factor on every gradient: 1 unless clipping is on and the norm exceeds grad_clip."""
    if config.grad_clip is None:
        return 1.0
    return min(1.0, config.grad_clip / (norm + CLIP_EPS))


RECIPE_FIELDS = ("lr", "warmup_steps", "lr_schedule", "min_lr", "steps", "weight_decay",
                 "grad_clip")


def recipe_state(config: TrainConfig) -> dict:
    """What a checkpoint stores of the recipe: with the step it fixes every later step's
    learning rate and clipping (both pure functions of settings and step; no other state)."""
    return {key: getattr(config, key) for key in RECIPE_FIELDS}


def recipe_changes(saved: dict | None, now: dict) -> str | None:
    """One line naming recipe settings (`now`: recipe_state) that differ from a checkpoint's,
    or None."""
    if not saved:
        return None
    diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RECIPE_FIELDS
            if k in saved and saved[k] != now[k]]
    return ("the recipe differs from the checkpoint's (" + ", ".join(diff) + "); later steps "
            "follow the new settings") if diff else None


def step_seed(seed: int, rank: int, step: int) -> int:
    """A torch seed from (seed, rank, step): reproducible runs with dropout, independent masks
    across ranks and steps, and a resumed run draws what the uninterrupted one drew."""
    digest = hashlib.sha256(f"hetrain/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def active_dropout(model: nn.Module | None) -> list[str]:
    """Names of the dropouts that would act in training (nn.Dropout* with p > 0, or a
    Hugging Face config's *dropout* fields > 0)."""
    if model is None:
        return []
    found = [name or type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    cfg = getattr(model, "config", None)
    for key, value in (vars(cfg).items() if cfg is not None and hasattr(cfg, "__dict__")
                       else []):
        if "dropout" in key and isinstance(value, int | float) and value > 0:
            found.append(f"config.{key}")
    return found


def dropout_note(model: nn.Module | None) -> str | None:
    """The once-per-run note on active dropout, or None."""
    found = active_dropout(model)
    if not found:
        return None
    names = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"dropout is active ({names}): runs are reproducible (seeded by seed, rank and "
            "step) but not plan-invariant, since masks depend on how samples are grouped")


def seed_generators(seed: int, device_type: str) -> None:
    """Seed the CPU generator and, on an accelerator, its device's: what the step draws from.
    (torch.manual_seed also queues a seeding of every accelerator module torch knows, with
    a stack trace each: a millisecond a step on a CPU worker.)"""
    torch.default_generator.manual_seed(seed)
    if device_type not in ("cpu", "meta"):
        torch.get_device_module(device_type).manual_seed(seed)


class StepRecipe:
    """A worker's recipe for each step: seed and learning rate first, the global norm and
    clipping before the optimizer, the figures for the step's record."""

    def __init__(self, config: TrainConfig, rank: int, tp_index: int,
                 params: list[tuple[str, int, nn.Parameter]], grad_sync,
                 optimizers: Callable[[], list[torch.optim.Optimizer]],
                 device_type: str = "cpu"):
        self.config, self.rank, self.device_type = config, rank, device_type
        self.params = [p for _, _, p in params]
        self.grad_sync = grad_sync
        self.optimizers = optimizers
        synced = grad_sync.synced_params()
        # Weights no sync counts: this rank adds their squares (replicas on TP rank 0 only).
        self.solo = [p for p in self.params if id(p) not in synced and
                     (tp_index == 0 or not _replicated(p))]
        self.lr = lr_at(config, 0)
        self.norm: float | None = None
        self.pending_sq = torch.zeros((), dtype=torch.float64)

    @property
    def clipping(self) -> bool:
        return self.config.grad_clip is not None

    def begin(self, step: int, loss_scaling: bool = False) -> None:
        """`loss_scaling`: ZeRO-1 steps wait for the overflow check (as for the norm)."""
        seed_generators(step_seed(self.config.seed, self.rank, step), self.device_type)
        self.lr = lr_at(self.config, step)
        set_lr(self.optimizers(), self.lr)
        self.grad_sync.defer_zero = self.clipping or loss_scaling
        self.grad_sync.norm_sq = 0.0
        self.norm = None

    def before_optimizer(self, loss_scale: float = 1.0) -> None:
        """This rank's share of the squared norm of the true (unscaled) gradients; with
        clipping on, the global norm (a collective over every rank); every gradient multiplied
        once by the clipping coefficient over `loss_scale`, the deferred ZeRO-1 pieces
        stepped with the same factor."""
        total = self.pending_sq = self._local_norm_sq() / loss_scale**2
        coef = 1.0
        if self.clipping:
            dist.all_reduce(total)
            self.norm = math.sqrt(float(total))
            coef = clip_coefficient(self.config, self.norm)
        factor = coef / loss_scale
        if factor != 1.0:
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(factor)
        self.grad_sync.finish_deferred(factor)

    def skip(self) -> None:
        """A step skipped on overflow: no norm to report."""
        self.pending_sq = torch.tensor(float("nan"), dtype=torch.float64)
        self.norm = None

    def unreduced_norm_sq(self) -> torch.Tensor:
        """This rank's share of the squared norm, still to be summed (0 when clipping did)."""
        if self.norm is not None:
            return torch.zeros((), dtype=torch.float64)
        return self.pending_sq

    def record(self, reduced_norm_sq: float) -> tuple[float, float, bool]:
        """(learning rate, global gradient norm before clipping, clipped) of the step."""
        norm = self.norm if self.norm is not None else math.sqrt(max(reduced_norm_sq, 0.0))
        return self.lr, norm, clip_coefficient(self.config, norm) < 1.0

    def _local_norm_sq(self) -> torch.Tensor:
        total = torch.tensor(self.grad_sync.norm_sq, dtype=torch.float64)
        for p in self.solo:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                total += g.detach().double().pow(2).sum().cpu()
        return total


def _replicated(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Replicate

    return not isinstance(t, DTensor) or all(isinstance(pl, Replicate) for pl in t.placements)

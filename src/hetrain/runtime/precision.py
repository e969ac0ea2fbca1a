"""Numerics of a worker: plain float32/float64, or mixed precision per kind (bf16 compute, or
fp16 with dynamic loss scaling on a kind without bf16, e.g. V100), fp32 master weights and
fp32 AdamW state.

Mixed precision is torch.autocast around each forward: parameters, their gradients and the
optimizer state stay fp32 (the master copy); matmuls run in the compute dtype; activations
cross between stages in the compute dtype; the gradient sum between holders runs on the fp32
gradients. An emulated kind computes in its own kind's dtype (on the CPU, whose autocast does
both bf16 and fp16), so a mixed job reproduces each kind's numerics.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hetrain.errors import ConfigError

MIXED = ("bf16", "fp16")
PLAIN = {"float32": torch.float32, "float64": torch.float64}
CATALOG_DTYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
                 torch.float16: "fp16"}  # cluster/kinds.py DTYPE_BYTES names


@dataclass(frozen=True)
class Precision:
    """One kind's numerics under a run's `precision` setting."""

    param_dtype: torch.dtype  # weights, gradients, optimizer state (the master copy)
    compute_dtype: torch.dtype | None = None  # autocast dtype; None: no autocast

    @property
    def mixed(self) -> bool:
        return self.compute_dtype is not None

    @property
    def activation_dtype(self) -> torch.dtype:
        """What stages send each other: the compute dtype under mixed precision."""
        return self.compute_dtype or self.param_dtype

    @property
    def loss_scaling(self) -> bool:
        """fp16 overflows without it (bf16 has fp32's exponent range)."""
        return self.compute_dtype == torch.float16

    @property
    def catalog_dtype(self) -> str:
        """The dtype the memory model prices this kind's stage group in."""
        return CATALOG_DTYPE[self.activation_dtype]

    def step_cache(self, device_type: str) -> AbstractContextManager:
        """Around a step's actions: autocast keeps its 16-bit copy of each weight until the
        outermost autocast region ends, so all micro-batches of the step share one copy
        (backward runs in here with autocast off, as it should)."""
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type, enabled=False)

    def autocast(self, device_type: str) -> AbstractContextManager:
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)


def precision_of(setting: str, kind_flops: dict[str, float] | None) -> Precision:
    """`setting` (TrainConfig.precision) on a kind whose catalog FLOP/s per dtype are
    `kind_flops`: "bf16" becomes fp16 + loss scaling where the kind lacks bf16, and plain
    fp32 where it has neither 16-bit dtype (the nominal CPU kind); "fp16" likewise."""
    if setting in PLAIN:
        return Precision(PLAIN[setting])
    if setting not in MIXED:
        raise ConfigError(f"unknown precision {setting!r}; use float32, float64, bf16 or fp16")
    flops = kind_flops or {}
    order = ("bf16", "fp16") if setting == "bf16" else ("fp16", "bf16")
    for dtype in order:
        if dtype in flops:
            return Precision(torch.float32, getattr(torch, _TORCH_NAME[dtype]))
    return Precision(torch.float32)


_TORCH_NAME = {"bf16": "bfloat16", "fp16": "float16"}


def param_dtype(setting: str) -> torch.dtype:
    """The dtype of parameters (master weights) under `setting`, whatever the kind."""
    return PLAIN.get(setting, torch.float32)


@dataclass
class LossScaler:
    """Dynamic loss scaling shared by every rank: the loss is multiplied by `scale` before
    backward, gradients are divided by it after their sum; a step whose gradients overflowed
    anywhere is skipped on every rank (one all-reduce of a flag) and the scale halved; after
    `growth_interval` clean steps it doubles. Every rank takes the same decisions, so the
    scale stays identical everywhere."""

    scale: float = 2.0**16
    growth_interval: int = 2000
    enabled: bool = True
    good_steps: int = 0
    skipped: list[int] = field(default_factory=list)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @property
    def current(self) -> float:
        """What this step's gradients carry (1 when scaling is off): the recipe divides the
        gradients and their norm by it (runtime/recipe.py)."""
        return self.scale if self.enabled else 1.0

    def step_ok(self, params: list[nn.Parameter], step: int,
                summed: list[torch.Tensor] = ()) -> bool:
        """Whether this step's gradients (the parameters', and `summed`: ZeRO-1 sums waiting
        for their step) are finite on every rank: a collective. False: the step is skipped
        everywhere (gradients cleared, scale halved); True: a clean step (the scale doubles
        after `growth_interval` of them)."""
        if not self.enabled:
            return True
        bad = torch.zeros((), dtype=torch.float32)
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in [*grads, *summed]):
            bad.fill_(1.0)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            for p in params:
                p.grad = None
            self.scale /= 2
            self.good_steps = 0
            self.skipped.append(step)
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2
            self.good_steps = 0
        return True


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def loss_scaler(setting: str, plan_kind_flops: list[dict[str, float]], scale: float = 2.0**16,
                growth_interval: int = 2000) -> LossScaler:
    """One scaler for the whole job: enabled when any kind of the plan computes in fp16, since
    gradients are summed across kinds and must all carry the same scale."""
    enabled = any(precision_of(setting, flops).loss_scaling for flops in plan_kind_flops)
    return LossScaler(scale=scale, growth_interval=growth_interval, enabled=enabled)


def run_memory_fn(memory_fn, setting: str, cluster):  # noqa: ANN001, ANN201 - plan.validate
    """`memory_fn` (plan.validate.MemoryFn) pricing each group in the dtype its kind computes
    in under `setting`, not the plan's: a float32 run of a bf16 plan holds fp32 activations."""
    def memory(group, in_flight: int) -> float:  # noqa: ANN001 - plan.StageGroup
        dtype = precision_of(setting, cluster.kinds[group.kind].flops).catalog_dtype
        return memory_fn(group.model_copy(update={"dtype": dtype}), in_flight)
    return memory

"""Training settings shared by the CLI, the Python API and the workers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "tiny"
    steps: int = Field(default=20, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**32, description="torch and data seeds derive "
                      "from it; bounded so they stay within torch's 64-bit seeds")
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # The recipe (runtime/recipe.py reads these): warm-up, schedule, global-norm clipping.
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up from lr/N to lr")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="after warm-up: constant, or cosine decay to min_lr "
        "at the last step")
    min_lr: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                    description="max global gradient norm; None: off")
    precision: Literal["float32", "float64", "bf16", "fp16"] = Field(
        default="float32", description="math of every worker; float64 makes exactness tests "
        "immune to the summation order Adam amplifies for near-zero gradients; bf16/fp16: "
        "mixed precision per kind, fp32 master weights (runtime/precision.py)")
    loss_scale: float = Field(default=2.0**16, gt=0, allow_inf_nan=False,
                              description="fp16 kinds: the initial loss scale")
    loss_scale_growth_interval: int = Field(
        default=2000, gt=0, description="fp16 kinds: clean steps before the scale doubles")
    data: str | None = Field(default=None, description="text file or folder; None: stdlib")
    time_scale: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="emulation stretch; None: calibrated at start")
    op_timeout_s: float = Field(default=120.0, gt=0, allow_inf_nan=False,
                                description="per collective / receive")
    hang_timeout_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="a worker silent (no heartbeat) this long is lost; "
        "None: a few of the slowest steps, at least 20 s")
    run_timeout_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="testing: a whole-run limit; None (runs of any length)")
    trace: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(default=0, ge=0)
    resume: bool = Field(
        default=True, description="continue the checkpoint folder's run when it holds one of "
        "this model and shape; False: refuse a folder holding checkpoints")
    fresh: bool = Field(
        default=False, description="start over: move the folder's checkpoints aside")
    run_id: str | None = Field(default=None, description="set by the launcher (run.json)")

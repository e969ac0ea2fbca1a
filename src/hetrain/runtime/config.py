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
    precision: Literal["float32", "float64"] = Field(
        default="float32", description="math of every worker; float64 makes exactness tests "
        "immune to the summation order Adam amplifies for near-zero gradients")
    data: str | None = Field(default=None, description="text file or folder; None: stdlib")
    time_scale: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="emulation stretch; None: calibrated at start")
    op_timeout_s: float = Field(default=120.0, gt=0, allow_inf_nan=False,
                                description="per collective / receive")
    run_timeout_s: float = Field(default=1800.0, gt=0, allow_inf_nan=False,
                                 description="whole run watchdog")
    trace: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(default=0, ge=0)
    resume: bool = False
    fail_at_step: int | None = Field(
        default=None, description="testing: one worker exits at this step (fault injection)")
    fail_rank: int = 0
    fail_mode: Literal["exit", "hang", "checkpoint"] = Field(
        default="exit", description="testing: the failing worker exits at the start of step "
        "fail_at_step, hangs there, or dies while writing the checkpoint of step fail_at_step")

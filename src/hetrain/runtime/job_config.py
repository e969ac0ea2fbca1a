"""The job file: one training job in sections (model, data, cluster, plan, optimizer, schedule,
checkpoint, logging), read from TOML or YAML, overridden by command-line flags, and turned
into the runtime's TrainConfig.

    [model]      name = "tiny"               # a built-in name, or a path the model part reads
    [data]       path = "corpus.txt"         # text file or folder; none: Python's stdlib
    [cluster]    path = "cluster.yaml"
    [plan]       global_batch = 48; seq_len = 64; search = true   # or path = "plan.json"
    [optimizer]  lr = 1e-3; weight_decay = 0.0; warmup_steps = 0; lr_schedule = "constant"
    [schedule]   steps = 20; seed = 0; precision = "float32"; loss_scale = 65536.0;
                 loss_scale_growth_interval = 2000 (fp16 kinds)
    [checkpoint] dir = "runs/a"; every = 10; resume = true; fresh = false
    [logging]    json_file = "out/run.json"; trace_file = "out/trace.json"; out_dir = "out/run"

Paths are taken as written, from the working folder, as the same flags are. Every error names
the section and field (`optimizer.lr`) or the flag that set it, and the fix. Settings that exist
for tests (fault injection) are not here: see runtime/faults.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hetrain.errors import ConfigError
from hetrain.runtime.config import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(_Section):
    name: str = Field(default="tiny", description="a built-in name (tiny, small, ...), a "
                      "Hugging Face config.json or folder, or a model YAML")


class DataSection(_Section):
    path: str | None = Field(default=None, description="text file or folder; None: stdlib")


class ClusterSection(_Section):
    path: str | None = Field(default=None, description="cluster YAML")
    time_scale: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                     description="emulation stretch; None: calibrated")
    hang_timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    op_timeout_s: float = Field(default=120.0, gt=0, allow_inf_nan=False)


class PlanSection(_Section):
    path: str | None = Field(default=None, description="plan JSON/YAML; None: planned here")
    global_batch: int = Field(default=48, gt=0, strict=True,
                              description="samples per step (without path)")
    seq_len: int = Field(default=64, ge=2, strict=True,
                         description="tokens per sample (without path)")
    search: bool = Field(default=True, description="without path: the planner's search; "
                         "False: data parallelism with speed-proportional shares")


class OptimizerSection(_Section):
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    warmup_steps: int = Field(default=0, ge=0, strict=True)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class ScheduleSection(_Section):
    steps: int = Field(default=20, gt=0, strict=True)
    seed: int = Field(default=0, ge=0, lt=2**32, strict=True)
    precision: Literal["float32", "float64", "bf16", "fp16"] = "float32"
    loss_scale: float = Field(default=2.0**16, gt=0, allow_inf_nan=False)
    loss_scale_growth_interval: int = Field(default=2000, gt=0, strict=True)


class CheckpointSection(_Section):
    dir: str | None = None
    every: int = Field(default=0, ge=0, strict=True)
    resume: bool = True
    fresh: bool = False


class LoggingSection(_Section):
    json_file: str | None = Field(default=None, description="the run's figures (JSON)")
    trace_file: str | None = Field(default=None, description="Chrome trace of the steps")
    out_dir: str | None = Field(default=None, description="keep the workers' reports here")


class JobConfig(_Section):
    """A whole training job; every section optional (its defaults apply)."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    cluster: ClusterSection = ClusterSection()
    plan: PlanSection = PlanSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()

    def train_config(self) -> TrainConfig:
        """The runtime's settings of this job."""
        return TrainConfig(
            model=self.model.name, steps=self.schedule.steps, seed=self.schedule.seed,
            lr=self.optimizer.lr, weight_decay=self.optimizer.weight_decay,
            warmup_steps=self.optimizer.warmup_steps, lr_schedule=self.optimizer.lr_schedule,
            min_lr=self.optimizer.min_lr, grad_clip=self.optimizer.grad_clip,
            precision=self.schedule.precision, loss_scale=self.schedule.loss_scale,
            loss_scale_growth_interval=self.schedule.loss_scale_growth_interval,
            data=self.data.path,
            time_scale=self.cluster.time_scale, op_timeout_s=self.cluster.op_timeout_s,
            hang_timeout_s=self.cluster.hang_timeout_s, trace=self.logging.trace_file is not None,
            checkpoint_dir=self.checkpoint.dir, checkpoint_every=self.checkpoint.every,
            resume=self.checkpoint.resume, fresh=self.checkpoint.fresh)

    def with_values(self, values: dict[str, Any], names: dict[str, str] | None = None
                    ) -> JobConfig:
        """This job with `values` ("section.field": value) replacing its own; an error names
        the value's entry in `names` (a flag, e.g. "--lr") or else its "section.field"."""
        data = self.model_dump()
        for key, value in values.items():
            section, field = key.split(".")
            data[section][field] = value
        return job_from_dict(data, "", names or {})


# What to do about a field that is out of range, by field name (of a section or TrainConfig).
FIXES = {
    "lr": "a learning rate must be a finite number > 0, e.g. 1e-3",
    "min_lr": "a learning rate must be a finite number >= 0",
    "steps": "pass a whole number of steps >= 1",
    "time_scale": "an emulation stretch must be a finite number > 0; leave it out to calibrate",
    "weight_decay": "weight decay must be a finite number >= 0",
    "op_timeout_s": "a timeout must be a finite number of seconds > 0",
    "hang_timeout_s": "a timeout must be a finite number of seconds > 0",
    "run_timeout_s": "a timeout must be a finite number of seconds > 0",
    "every": "pass 0 (checkpoints only on SIGTERM) or a step count >= 1",
    "checkpoint_every": "pass 0 (checkpoints only on SIGTERM) or a step count >= 1",
    "precision": "use float32, float64, bf16 or fp16 (mixed precision per kind)",
    "seed": "pass a whole number in [0, 2**32)",
    "global_batch": "pass a whole number of samples >= 1",
    "seq_len": "pass a whole number of tokens >= 2",
    "warmup_steps": "pass a whole number of steps >= 0",
    "lr_schedule": "use constant or cosine",
    "grad_clip": "a clipping norm must be a finite number > 0; leave it out for none",
}


def job_from_dict(data: Any, source: str = "", names: dict[str, str] | None = None
                  ) -> JobConfig:
    """A JobConfig from nested sections; ConfigError naming `source`, the section.field (or
    its flag in `names`) and the fix."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}a job file holds sections ({', '.join(_SECTIONS)}), not "
                          f"{type(data).__name__}")
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{prefix}unknown section [{section}]; the sections are "
                              f"{', '.join(_SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{prefix}[{section}] must be a table of fields, not "
                              f"{type(body).__name__} {body!r}")
    try:
        return JobConfig(**data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        key = ".".join(loc[:2])
        field = loc[1] if len(loc) > 1 else loc[0]
        where = (names or {}).get(key, key)
        if first["type"] == "extra_forbidden":
            known = ", ".join(type(getattr(JobConfig(), loc[0])).model_fields)
            raise ConfigError(f"{prefix}{where}: unknown field; the fields of [{loc[0]}] are "
                              f"{known}") from None
        fix = FIXES.get(field, first["msg"])
        raise ConfigError(f"{prefix}{where}: {fix} (got {first.get('input')!r})") from None


def load_job(path: str | Path) -> JobConfig:
    """Read a job file (.toml, or .yaml/.yml); ConfigError naming the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot be read ({err})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: a job file is .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({first})") from None
    return job_from_dict(data, str(path))


_SECTIONS = tuple(JobConfig.model_fields)

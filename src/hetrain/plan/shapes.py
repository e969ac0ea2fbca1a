"""The shape of each plan shorthand (types, ranges, known fields), checked before expansion so
a malformed file is refused with one line naming the field, never a TypeError."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hetrain.cluster.loading import validation_message
from hetrain.errors import PlanError


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageShape(_Shape):
    kind: str | None = None
    devices: list[str] | None = Field(default=None, min_length=1)
    tp: int = Field(default=1, gt=0)
    layers: tuple[int, int] | None = None
    dtype: str | None = None
    recompute: bool | None = None
    regather: bool | None = None
    in_flight_scale: float | None = Field(default=None, ge=1.0)
    shard_weight: float | None = Field(default=None, gt=0)


class MeshStageShape(StageShape):
    dp: int = Field(default=1, gt=0)


class PipelineShape(_Shape):
    micro_batches: int = Field(gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    stages: list[StageShape] = Field(min_length=1)


class MeshShape(_Shape):
    micro_batches: int | None = Field(default=None, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    stages: list[MeshStageShape] = Field(min_length=1)


class ShareShape(_Shape):
    kind: str | None = None
    device: str | None = None
    tp: int = Field(default=1, gt=0)
    samples: int = Field(gt=0)
    layers: tuple[int, int] | None = None
    micro_batch_size: int | None = Field(default=None, gt=0)
    dtype: str | None = None
    recompute: bool | None = None
    regather: bool | None = None
    in_flight_scale: float | None = Field(default=None, ge=1.0)
    shard_weight: float | None = Field(default=None, gt=0)


class _Top(BaseModel):
    # Fields other than the shorthand's are checked by Plan after expansion.
    model_config = ConfigDict(extra="allow")

    micro_batch_size: int = Field(default=1, gt=0)


class PipelinesPlan(_Top):
    pipelines: list[PipelineShape] = Field(min_length=1)


class MeshPlan(_Top):
    mesh: MeshShape


class DataParallelPlan(_Top):
    n_layers: int | None = Field(default=None, gt=0)
    data_parallel: list[ShareShape] = Field(min_length=1)


SHAPES: dict[str, type[_Top]] = {"pipelines": PipelinesPlan, "mesh": MeshPlan,
                                 "data_parallel": DataParallelPlan}


def checked_shorthand(name: str, raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` with its shorthand `name` checked; only the fields the user gave are kept."""
    try:
        shape = SHAPES[name].model_validate(raw)
    except ValidationError as err:
        raise PlanError(validation_message(err, source)) from None
    return shape.model_dump(exclude_unset=True)

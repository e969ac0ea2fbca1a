"""Plan: stage groups and the routes micro-batches take through them.

A stage group is devices of ONE kind (a tensor-parallel group when more than one) holding a
contiguous layer range [start, end) of the ModelSpec's layers (embed = 0, blocks, head = last).
A route is an ordered chain of stage groups covering every layer once, and the micro-batches
that take it. A plain pipeline is a route; routes may share stage groups; data parallelism is
several routes. Samples of the global batch go to routes in route order, micro-batch by
micro-batch, so the plan alone fixes which device sees which sample.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hetrain.cluster.kinds import DTYPES

# Micro-batches one step may hold: the schedule lists each, so a typo like
# `micro_batches: 1000000000000` is refused before anything is allocated.
MAX_MICRO_BATCHES = 1_000_000
ScheduleKind = Literal["1f1b", "zero_bubble"]


class StageGroup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: str = Field(min_length=1)
    devices: list[str] = Field(min_length=1, description="device ids; more than one = TP group")
    layers: tuple[int, int] = Field(description="[start, end) in ModelSpec layers")
    dtype: str = "fp32"
    recompute: bool = False
    regather: bool = Field(
        default=False, description="under sequence parallelism (a TP group of the reference "
        "decoder): keep the matmuls' all-gathered input as this rank's shard and gather it "
        "again in backward (less memory, more TP traffic); ignored when recomputing")
    in_flight_scale: float = Field(
        default=1.0, ge=1.0, description="micro-batches the group may hold activations for, "
        "as a multiple of the 1F1B limit (more fills pipeline warm-up, costs memory)")
    shard_weight: float = Field(
        default=1.0, gt=0, description="with a sharded optimizer: this group's devices take "
        "shares of a bucket's optimizer state in proportion to this weight")

    @field_validator("layers")
    @classmethod
    def _range(cls, layers: tuple[int, int]) -> tuple[int, int]:
        start, end = layers
        if start < 0 or end <= start:
            raise ValueError(f"layer range [{start}, {end}) is empty or negative; need start < end")
        return layers

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return dtype

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]


class Route(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: list[str] = Field(min_length=1, description="stage group names, first layer first")
    micro_batches: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0, description="samples per micro-batch")

    @property
    def samples(self) -> int:
        return self.micro_batches * self.micro_batch_size


class MicroBatch(BaseModel):
    """Global micro-batch `id` on route `route` takes samples [first_sample, first_sample+size)."""

    model_config = ConfigDict(frozen=True)

    id: int
    route: int
    index: int  # within its route
    first_sample: int
    size: int


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    seq_len: int = Field(gt=0)
    global_batch: int = Field(gt=0, description="samples per optimizer step")
    stage_groups: list[StageGroup] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    schedule: ScheduleKind = Field(
        default="1f1b", description="1f1b: forward then whole backward; zero_bubble: each "
        "backward split into an input-gradient and a later weight-gradient action")
    sharded_optimizer: bool = Field(
        default=False, description="ZeRO-1: each holder keeps the optimizer state of its "
        "shard of every gradient bucket, sized by shard_weight")
    seq_chunks: int = Field(
        default=1, ge=1, le=64, description="sequence chunks (TeraPipe-style): each micro-batch "
        "passes the pipeline as this many consecutive pieces of its sequence, the later ones "
        "attending to the earlier ones' keys and values; the pipeline fills and drains in "
        "pieces this much shorter")
    half_layers: bool = Field(
        default=False, description="stage groups' layer ranges count half layers: the "
        "embedding, then each block as its attention half and its MLP half, then the head "
        "(2 n_blocks + 2 units), so a stage boundary may fall inside a block (the reference "
        "decoder's blocks only)")
    predicted: dict[str, float] = Field(default_factory=dict, description="planner's estimates")

    @model_validator(mode="after")
    def _bounded(self) -> Plan:
        total = sum(route.micro_batches for route in self.routes) * self.seq_chunks
        if total > MAX_MICRO_BATCHES:
            raise ValueError(f"routes: {total:,} micro-batches (x seq_chunks) per step, more "
                             f"than the limit of {MAX_MICRO_BATCHES:,}; use fewer, larger "
                             "micro-batches or fewer sequence chunks")
        if self.seq_len % self.seq_chunks:
            raise ValueError(f"seq_chunks: {self.seq_chunks} does not divide seq_len "
                             f"{self.seq_len}; use a divisor of it (1: whole sequences)")
        return self

    @property
    def chunk_len(self) -> int:
        """Tokens of one sequence chunk (seq_len without sequence chunks)."""
        return self.seq_len // self.seq_chunks

    @cached_property
    def group_by_name(self) -> dict[str, StageGroup]:
        return {g.name: g for g in self.stage_groups}

    @cached_property
    def micro_batches(self) -> list[MicroBatch]:
        out, sample = [], 0
        for r, route in enumerate(self.routes):
            for i in range(route.micro_batches):
                out.append(MicroBatch(id=len(out), route=r, index=i, first_sample=sample,
                                      size=route.micro_batch_size))
                sample += route.micro_batch_size
        return out

    def devices(self) -> list[str]:
        return [d for g in self.stage_groups for d in g.devices]

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(g.kind for g in self.stage_groups))

    @cached_property
    def _routes_by_group(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for r, route in enumerate(self.routes):
            for g in dict.fromkeys(route.stages):
                out.setdefault(g, []).append(r)
        return out

    def routes_through(self, group: str) -> list[int]:
        """The routes through the group, in route order (a plan of thousands of routes asks
        for every group's: read from one pass over the routes)."""
        return list(self._routes_by_group.get(group, ()))

    def samples_of(self, group: str) -> int:
        return sum(self.routes[r].samples for r in self.routes_through(group))

    def micro_batches_of(self, group: str) -> int:
        """Micro-batches the group runs a step, over every route through it."""
        return sum(self.routes[r].micro_batches for r in self.routes_through(group))

    def holders(self, layer: int) -> list[StageGroup]:
        """Stage groups holding `layer`: their gradients for it are summed."""
        return [g for g in self.stage_groups if g.layers[0] <= layer < g.layers[1]]

    def gradient_holders(self, layer: int, tied_last: int | None = None) -> tuple[str, ...]:
        """Names of the groups whose gradients for `layer` are summed, sorted. With tied
        embeddings (`tied_last`: the head's layer) the embedding's holders include the head's.
        The runtime's gradient sync and the simulator both use it."""
        names = {g.name for g in self.holders(layer)}
        if tied_last is not None and layer == 0:
            names |= {g.name for g in self.holders(tied_last)}
        return tuple(sorted(names))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)

    def save(self, path: str | Path) -> None:
        from hetrain.plan.io import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

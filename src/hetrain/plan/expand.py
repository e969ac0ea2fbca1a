"""Shorthands that expand to the general form: data_parallel, pipelines, mesh.

    pipelines: [{micro_batches: 6, stages: [{kind: H100, layers: [0, 3]}, ...]}]
    mesh: {micro_batches: 12, stages: [{kind: H100, dp: 2, tp: 1, layers: [0, 3]}, ...]}
    data_parallel: [{kind: H100, samples: 40}, {device: "a100:0", samples: 24}]

A stage picks devices by `devices: [ids]`, or takes the next free ones of its kind (`tp`
of them). micro_batch_size is plan-wide unless a route or pipeline sets its own.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from hetrain.cluster.loading import validation_message
from hetrain.cluster.topology import Cluster
from hetrain.errors import PlanError
from hetrain.plan.shapes import checked_shorthand
from hetrain.plan.types import Plan

SHORTHANDS = ("data_parallel", "pipelines", "mesh")


class _Allocator:
    """Hands out free devices of a kind, keeping a tensor-parallel group inside one node."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.used: set[str] = set()

    def take(self, kind: str, n: int, where: str) -> list[str]:
        if kind not in self.cluster.kinds or not self.cluster.devices_of(kind):
            raise PlanError(f"{where}: kind {kind!r} is not in the cluster "
                            f"(it has {', '.join(self.cluster.kind_counts())})")
        by_node: dict[str, list[str]] = {}
        for d in self.cluster.devices_of(kind):
            if d.id not in self.used:
                by_node.setdefault(d.node, []).append(d.id)
        for ids in by_node.values():
            if len(ids) >= n:
                self.used.update(ids[:n])
                return ids[:n]
        raise PlanError(f"{where}: needs {n} free {kind} in one node; the cluster has no more")

    def claim(self, ids: list[str]) -> list[str]:
        self.used.update(ids)
        return ids


def expand_plan(raw: dict[str, Any], cluster: Cluster, source: str = "plan") -> Plan:
    raw = dict(raw)
    present = [k for k in SHORTHANDS if k in raw]
    if len(present) > 1:
        raise PlanError(f"{source}: use one of {', '.join(present)}, not several")
    if present:
        if "stage_groups" in raw or "routes" in raw:
            raise PlanError(f"{source}: '{present[0]}' replaces stage_groups/routes; drop them")
        raw = checked_shorthand(present[0], raw, source)
        mbs = raw.pop("micro_batch_size", 1)
        alloc = _Allocator(cluster)
        body = raw.pop(present[0])
        groups, routes = {"data_parallel": _data_parallel, "pipelines": _pipelines,
                          "mesh": _mesh}[present[0]](body, mbs, alloc, raw, source)
        raw["stage_groups"], raw["routes"] = groups, routes
        raw.setdefault("global_batch", sum(r["micro_batches"] * r["micro_batch_size"]
                                           for r in routes))
    try:
        return Plan.model_validate(raw)
    except ValidationError as err:
        raise PlanError(validation_message(err, source)) from None


def _stage_devices(stage: dict, alloc: _Allocator, where: str) -> tuple[str, list[str]]:
    if "devices" in stage:
        ids = list(stage["devices"])
        kinds = {alloc.cluster.device_by_id[i].kind for i in ids if i in alloc.cluster.device_by_id}
        return stage.get("kind") or (kinds.pop() if len(kinds) == 1 else ""), alloc.claim(ids)
    if "kind" not in stage:
        raise PlanError(f"{where}: give 'kind' (and 'tp') or 'devices'")
    return stage["kind"], alloc.take(stage["kind"], int(stage.get("tp", 1)), where)


def _group(name: str, kind: str, devices: list[str], stage: dict) -> dict:
    out = {"name": name, "kind": kind, "devices": devices, "layers": stage.get("layers")}
    for key in ("dtype", "recompute", "regather", "in_flight_scale", "shard_weight"):
        if key in stage:
            out[key] = stage[key]
    return out


def _data_parallel(body: list, mbs: int, alloc: _Allocator, raw: dict, source: str):
    groups, routes = [], []
    n_layers = raw.pop("n_layers", None)
    for i, share in enumerate(body):
        where = f"{source}: data_parallel[{i}]"
        stage = {"kind": share.get("kind"), "tp": share.get("tp", 1)}
        if "device" in share:
            stage = {"devices": [share["device"]], "kind": share.get("kind")}
        kind, devices = _stage_devices(stage, alloc, where)
        layers = share.get("layers") or ([0, n_layers] if n_layers else None)
        if layers is None:
            raise PlanError(f"{where}: give 'layers' or a plan-wide 'n_layers'")
        groups.append(_group(f"dp{i}", kind, devices, {**share, "layers": layers}))
        size = int(share.get("micro_batch_size", mbs))
        samples = int(share["samples"])
        if samples % size:
            raise PlanError(f"{where}: samples {samples} is not a multiple of micro_batch_size "
                            f"{size}")
        routes.append({"stages": [f"dp{i}"], "micro_batches": samples // size,
                       "micro_batch_size": size})
    return groups, routes


def _pipelines(body: list, mbs: int, alloc: _Allocator, raw: dict, source: str):
    groups, routes = [], []
    for p, pipe in enumerate(body):
        names = []
        for s, stage in enumerate(pipe.get("stages", [])):
            where = f"{source}: pipelines[{p}].stages[{s}]"
            kind, devices = _stage_devices(stage, alloc, where)
            names.append(f"p{p}s{s}")
            groups.append(_group(names[-1], kind, devices, stage))
        routes.append({"stages": names, "micro_batches": pipe.get("micro_batches"),
                       "micro_batch_size": pipe.get("micro_batch_size", mbs)})
    return groups, routes


def _mesh(body: dict, mbs: int, alloc: _Allocator, raw: dict, source: str):
    stages = body.get("stages", [])
    dps = [int(s.get("dp", 1)) for s in stages]
    groups, replicas = [], []
    for s, stage in enumerate(stages):
        names = []
        for d in range(dps[s]):
            where = f"{source}: mesh.stages[{s}] replica {d}"
            kind, devices = _stage_devices({k: v for k, v in stage.items() if k != "devices"},
                                           alloc, where)
            names.append(f"s{s}r{d}")
            groups.append(_group(names[-1], kind, devices, stage))
        replicas.append(names)
    n_routes = math.lcm(*dps) if dps else 1
    total = int(body.get("micro_batches", n_routes))
    if total < n_routes:
        raise PlanError(f"{source}: mesh.micro_batches {total} is fewer than the {n_routes} "
                        "routes the dp degrees make (their least common multiple)")
    routes = [
        {"stages": [replicas[s][r % dps[s]] for s in range(len(stages))],
         "micro_batches": total // n_routes + (r < total % n_routes),
         "micro_batch_size": body.get("micro_batch_size", mbs)}
        for r in range(n_routes)
    ]
    return groups, routes

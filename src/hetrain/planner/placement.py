"""Place chosen template copies on devices and write them down as a Plan.

Groups are placed largest tensor-parallel size first, each in the first node of its kind with
enough free devices; with power-of-two sizes this packs whenever the count program's
per-size bounds hold. Within one size, groups go in pipeline order, so a copy's stages and
a stage's replicas land in the same node when they fit there.
"""

from __future__ import annotations

from collections.abc import Sequence

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import RECOMPUTE, REGATHER
from hetrain.errors import PlannerError
from hetrain.model.spec import ModelSpec
from hetrain.plan.types import Plan, Route, StageGroup
from hetrain.planner.counts import Choice
from hetrain.planner.templates import Template


class DevicePool:
    """Free devices per node, in cluster order."""

    def __init__(self, cluster: Cluster):
        self.free: dict[str, list[str]] = {}
        self.kind_of_node: dict[str, str] = {}
        for dev in cluster.devices:
            self.free.setdefault(dev.node, []).append(dev.id)
            self.kind_of_node[dev.node] = dev.kind

    def take(self, kind: str, tp: int) -> list[str]:
        for node, ids in self.free.items():
            if self.kind_of_node[node] == kind and len(ids) >= tp:
                taken, self.free[node] = ids[:tp], ids[tp:]
                return taken
        raise PlannerError(f"cannot place a tensor-parallel group of {tp} {kind} in one node")


def split_micro_batches(total: int, copies: int) -> list[int]:
    """Even split: the first total % copies copies take one more."""
    q, r = divmod(total, copies)
    return [q + (i < r) for i in range(copies)]


def place_plan(cluster: Cluster, spec: ModelSpec, templates: Sequence[Template],
               choices: Sequence[Choice], micro_batch_size: int, global_batch: int,
               options=None) -> Plan:
    """The plan of the chosen copies. `options` (search.SearchOptions) sets the schedule
    kind and the sharded optimizer; a sharded optimizer's shares follow each kind's memory."""
    # (template, copy, stage) for every group, then devices, largest tp first
    wanted = []
    for c in choices:
        tpl = templates[c.template]
        for copy in range(c.copies):
            for s, (kind, tp) in enumerate(tpl.stages):
                wanted.append((c.template, copy, s, kind, tp))
    pool = DevicePool(cluster)
    devices = {}
    for item in sorted(wanted, key=lambda w: -w[4]):
        devices[item[:3]] = pool.take(item[3], item[4])

    groups, routes = [], []
    for c in choices:
        tpl = templates[c.template]
        part = tpl.partition
        for copy, m in enumerate(split_micro_batches(c.micro_batches, c.copies)):
            r = len(routes)
            names = []
            for s, (kind, _tp) in enumerate(tpl.stages):
                names.append(f"p{r}s{s}")
                groups.append(StageGroup(name=names[-1], kind=kind,
                                         devices=devices[(c.template, copy, s)],
                                         layers=part.layers[s], dtype=tpl.dtypes[s],
                                         recompute=part.modes[s] == RECOMPUTE,
                                         regather=part.modes[s] == REGATHER,
                                         in_flight_scale=tpl.in_flight_scale,
                                         shard_weight=cluster.kinds[kind].memory_gib))
            routes.append(Route(stages=names, micro_batches=m, micro_batch_size=micro_batch_size))
    assert sum(r.samples for r in routes) == global_batch, "micro-batches do not cover the batch"
    return Plan(model=spec.name, seq_len=spec.seq_len, global_batch=global_batch,
                stage_groups=groups, routes=routes,
                schedule=options.schedule if options is not None else "1f1b",
                sharded_optimizer=bool(options is not None and options.sharded_optimizer),
                half_layers=spec.half_layers)


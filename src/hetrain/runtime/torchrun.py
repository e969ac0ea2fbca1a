"""One rank under torchrun, on one or many agents (hosts): which plan device this process
runs, the plan for the nodes present (the survivors' after an elastic restart), the one
owner of the run folder, and the process group in the plan's rank order.

torchrun numbers ranks by agent, in rendezvous order; hetrain's rank is a device's index in
the plan. Each agent says which nodes of the cluster YAML it holds (`HETRAIN_NODES=a,b`;
unset: one agent holds them all, or agent k the k-th node the plan uses); its processes take
that host's plan devices in plan order, by LOCAL_RANK. Every process gathers the others'
nodes over a first process group (torchrun's ranks), computes the same layout, and the
process of plan rank 0 owns the checkpoint folder (runtime/runlock.py) for the attempt and
hands the run id to the others; then the group is re-formed in the plan's order. After an
elastic restart without some hosts, the plan is `replan`'s for the survivors; processes it
leaves without a device idle until the others are done.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hetrain.cluster.topology import Cluster
from hetrain.errors import CheckpointError, HetrainError, RuntimeFailure
from hetrain.plan.io import atomic_write_text
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.job import Job
from hetrain.runtime.launch import ReplanFn, _worker_entry, check_plan, plan_spec
from hetrain.runtime.runlock import RUN, RunComplete, read_run, run_folder

NODES_ENV = "HETRAIN_NODES"
UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
DONE, LEFT = "done", "left"  # store keys: the workers have finished; idle processes gone


@dataclass(frozen=True)
class Proc:
    """One torchrun process as it describes itself to the others."""

    nodes: tuple[str, ...]  # the cluster nodes its agent (host) holds
    local_rank: int
    local_world: int
    restart: int  # its agent's TORCHELASTIC_RESTART_COUNT


@dataclass(frozen=True)
class Layout:
    """The plan this attempt runs and each torchrun rank's rank in it."""

    cluster: Cluster  # without the nodes no agent holds
    plan: Plan
    plan_rank: list[int | None]  # by torchrun rank; None: idle (no plan device left for it)
    replanned: bool  # the survivors' plan, not the given one

    @property
    def world(self) -> int:
        return len(self.plan.devices())


def agent_nodes(cluster: Cluster, plan: Plan, group_rank: int, group_world: int
                ) -> tuple[str, ...]:
    """The cluster nodes this process's agent holds (see the module's docstring)."""
    named = os.environ.get(NODES_ENV, "").strip()
    if named:
        nodes = tuple(n.strip() for n in named.split(",") if n.strip())
        unknown = [n for n in nodes if n not in cluster.node_by_name]
        if unknown:
            raise RuntimeFailure(f"{NODES_ENV}: no node {', '.join(unknown)} in cluster "
                                 f"{cluster.name} (nodes: {', '.join(cluster.node_by_name)})")
        return nodes
    if group_world == 1:
        return tuple(cluster.node_by_name)
    used = _plan_nodes(cluster, plan)
    if len(used) != group_world:
        raise RuntimeFailure(f"{group_world} torchrun agents but the plan uses {len(used)} "
                             f"nodes ({', '.join(used)}); set {NODES_ENV} on each agent to "
                             "the nodes it holds")
    return (used[group_rank],)


def _plan_nodes(cluster: Cluster, plan: Plan) -> list[str]:
    used = {cluster.device_by_id[d].node for d in plan.devices()}
    return [n for n in cluster.node_by_name if n in used]


def rank_layout(cluster: Cluster, plan: Plan, config: TrainConfig, procs: list[Proc],
                replan: ReplanFn | None) -> Layout:
    """The plan for the nodes the agents hold (the given one when they hold all its devices,
    else `replan` on the survivors) and each process's rank in it; RuntimeFailure naming the
    agent whose process count does not match."""
    agents: dict[tuple[str, ...], int] = {}
    for p in procs:
        agents.setdefault(p.nodes, p.local_world)
    claimed = [n for nodes in agents for n in nodes]
    twice = sorted({n for n in claimed if claimed.count(n) > 1})
    if twice:
        raise RuntimeFailure(f"node {', '.join(twice)} is held by two torchrun agents; give "
                             f"each agent its own nodes ({NODES_ENV})")
    present = set(claimed)
    lost = {d.id for d in cluster.devices if d.node not in present}
    replanned = any(cluster.device_by_id[d].node not in present for d in plan.devices())
    if replanned:
        if replan is None:
            raise RuntimeFailure(f"the plan uses devices on nodes no torchrun agent holds "
                                 f"({', '.join(sorted(_plan_nodes(cluster, plan)))} needed, "
                                 f"{', '.join(sorted(present))} present)")
        cluster = cluster.without(lost)
        plan = replan(cluster, plan, config)
    elif lost:
        cluster = cluster.without(lost)
    devices = plan.devices()
    rank_of = {d: r for r, d in enumerate(devices)}
    local: dict[tuple[str, ...], list[str]] = {
        nodes: [d for d in devices if cluster.device_by_id[d].node in nodes] for nodes in agents}
    for nodes, world in agents.items():
        # A re-plan may leave devices out: their processes idle. A given plan is matched.
        if len(local[nodes]) > world or (len(local[nodes]) < world and not replanned):
            raise RuntimeFailure(
                f"the torchrun agent holding {', '.join(nodes)} started {world} processes but "
                f"the plan has {len(local[nodes])} devices there; pass --nproc-per-node "
                f"{len(local[nodes])}")
    ranks = [rank_of[local[p.nodes][p.local_rank]] if p.local_rank < len(local[p.nodes])
             else None for p in procs]
    return Layout(cluster, plan, ranks, replanned)


def init_ranks(cluster: Cluster, plan: Plan, config: TrainConfig,
               replan: ReplanFn | None) -> tuple[Layout, int, list[Proc]]:
    """Join torchrun's group, agree on the layout; returns it, this process's torchrun rank
    and every process's description. The group stays up for claim_folder()."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=config.op_timeout_s)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=timeout)
    me = Proc(agent_nodes(cluster, plan, int(os.environ.get("GROUP_RANK", "0")),
                          int(os.environ.get("GROUP_WORLD_SIZE", "1"))),
              int(os.environ.get("LOCAL_RANK", "0")),
              int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
              int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    procs = [Proc(tuple(p["nodes"]), p["local_rank"], p["local_world"], p["restart"])
             for p in all_gather_json(me.__dict__)]
    return rank_layout(cluster, plan, config, procs, replan), rank, procs


def claim_folder(config: TrainConfig, plan: Plan, owner: int, rank: int, restarted: bool,
                 stack: ExitStack) -> TrainConfig:
    """The torchrun rank `owner` (plan rank 0) takes the run folder's lock for as long as
    `stack` is open and decides the run (runlock.run_folder); every rank gets its decision.
    RunComplete on every rank when the run is already done."""
    decision: dict[str, Any] = {}
    if rank == owner:
        try:
            decision = {"config": _own_folder(config, plan, restarted, stack)}
        except RunComplete as done:
            decision = {"complete": str(done), "step": done.step}
        except HetrainError as err:
            decision = {"error": str(err), "type": type(err).__name__}
        except OSError as err:  # the peers wait on this answer: never leave them without one
            decision = {"error": f"cannot use checkpoint folder {config.checkpoint_dir}: "
                        f"{err.strerror or err}", "type": "CheckpointError"}
    decision = broadcast_json(decision, owner)
    if "complete" in decision:
        raise RunComplete(decision["complete"], decision["step"])
    if "error" in decision:  # the folder is another run's, or unusable: one line, every rank
        raise (CheckpointError if decision["type"] == "CheckpointError" else
               RuntimeFailure)(decision["error"])
    return config.model_copy(update=decision["config"])


def _own_folder(config: TrainConfig, plan: Plan, restarted: bool,
                stack: ExitStack) -> dict[str, Any]:
    """Lock and claim the folder. An elastic restart of this torchrun job continues its own
    run: `--fresh` and `--no-resume` apply to the job's first attempt only."""
    if not config.checkpoint_dir:
        return {}
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    root = Path(config.checkpoint_dir).resolve()
    ours = job not in ("", "none") and (read_run(root) or {}).get("torchrun_job") == job \
        if (root / RUN).exists() else False
    if restarted or ours:
        config = config.model_copy(update={"fresh": False, "resume": True})
    claimed = stack.enter_context(run_folder(config, plan))
    if job and (root / RUN).exists():  # later attempts of this job know the run as theirs
        run = read_run(root) or {}
        if run.get("torchrun_job") != job:
            atomic_write_text(root / RUN, json.dumps({**run, "torchrun_job": job}) + "\n")
    return {"run_id": claimed.run_id, "resume": claimed.resume, "fresh": False}


def regroup(layout: Layout, rank: int, config: TrainConfig) -> tuple[int | None, dist.Store]:
    """Re-form the process group in the plan's rank order; returns this process's rank
    (None: idle, not in the group) and the attempt's store."""
    token = broadcast_json({"token": secrets.token_hex(8)}, 0)["token"]
    base = _store(rank, len(layout.plan_rank), config.op_timeout_s)  # before the group goes
    store = dist.PrefixStore(f"hetrain/{token}/", base)
    dist.destroy_process_group()
    plan_rank = layout.plan_rank[rank]
    if plan_rank is not None:
        dist.init_process_group("gloo", store=store, rank=plan_rank, world_size=layout.world,
                                timeout=timedelta(seconds=config.op_timeout_s))
    return plan_rank, store


def _hold_until_done(store: dist.Store) -> None:
    """An idle process stays until plan rank 0 is done (without the agent's store, torchrun's
    rank 0 hosts the one the group uses, and may be idle), then says it leaves."""
    while not store.check([DONE]):
        time.sleep(0.5)
    store.add(LEFT, 1)


def _release_idle(store: dist.Store, idle: int, timeout_s: float = 30.0) -> None:
    """Plan rank 0, the workers done: let the idle processes go, and wait for them (one of
    them may host the store this process reads)."""
    store.set(DONE, "1")
    deadline = time.monotonic() + timeout_s
    while idle and store.add(LEFT, 0) < idle and time.monotonic() < deadline:
        time.sleep(0.1)


def _store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """A client of torchrun's store: the agent's (c10d rendezvous), else the one torchrun's
    rank 0 hosts (its server is shared with this process's first group's store)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=not agent and rank == 0, multi_tenant=True,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON value, in rank order (bytes over gloo: nothing unpickled)."""
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = data
    out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, padded)
    return [json.loads(bytes(t[:int(n.item())].tolist())) for t, n in zip(out, sizes,
                                                                           strict=True)]


def broadcast_json(obj: Any, src: int) -> Any:
    """`src`'s JSON value on every rank."""
    data = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(data)])
    dist.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if dist.get_rank() == src:
        buf[:] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.tolist()))


def check_restartable() -> None:
    """torchrun's c10d rendezvous shares its store with the workers and keeps the previous
    attempt's keys in it, so a restarted group cannot form (pytorch issue #135712): refuse
    restarts on a shared store before any step, with the fix."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        raise RuntimeFailure(f"torchrun --max-restarts {restarts} with its shared store cannot "
                             "re-form the workers after a restart (pytorch issue #135712); set "
                             f"{UNSHARED_STORE}=1 in each agent's environment")


def run_rank(cluster: Cluster, plan: Plan, config: TrainConfig, out_dir: str,
             replan: ReplanFn | None = None) -> None:
    """Process entry under torchrun: place this rank, own the folder (plan rank 0), train."""
    from hetrain.runtime.watchdog import die_with_parent

    die_with_parent(os.getppid())  # a worker never outlives its agent
    check_restartable()
    torch.set_num_threads(1)
    layout, rank, procs = init_ranks(cluster, plan, config, replan)
    if layout.replanned:  # the survivors' plan is checked as a given one is
        check_plan(layout.plan, layout.cluster, plan_spec(layout.plan, None), config.precision)
    owner = layout.plan_rank.index(0)
    restarted = max(p.restart for p in procs) > 0
    with ExitStack() as stack:
        try:
            config = claim_folder(config, layout.plan, owner, rank, restarted, stack)
        except RunComplete as done:
            if rank == owner:
                print(done, flush=True)
            dist.destroy_process_group()
            return
        plan_rank, store = regroup(layout, rank, config)
        if plan_rank is None:  # the survivors' plan has no device for this process
            _hold_until_done(store)
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        job = _job(layout, config, out_dir, procs[rank].nodes)
        _worker_entry(job, plan_rank, layout.world)
        if plan_rank == 0:  # every rank passed the workers' last barrier
            _release_idle(store, layout.plan_rank.count(None))


def _job(layout: Layout, config: TrainConfig, out_dir: str, nodes: tuple[str, ...]) -> Job:
    """The worker's job; a real kind's device is the host's i-th device of that kind, i its
    index among this host's plan devices of the kind."""
    from hetrain.runtime.emulation import real_devices_by_kind

    cluster, plan = layout.cluster, layout.plan
    real = real_devices_by_kind(plan, cluster)
    devices: dict[str, str] = {}
    for kind, torch_devices in real.items():
        here = [d for d in plan.devices() if cluster.device_by_id[d].node in nodes
                and cluster.device_by_id[d].kind == kind]
        devices.update(zip(here, torch_devices, strict=False))
    return Job(cluster=cluster, plan=plan, config=config, out_dir=out_dir,
               time_scale=config.time_scale or 1.0, emulated=set(plan.kinds()) - set(real),
               torch_device_of=devices)

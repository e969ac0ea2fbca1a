"""One worker process: builds its stage, then runs the plan's schedule step after step.

A step: the stage group's forward/backward actions in schedule order (receiving and sending
activations and gradients), the gradient sum over all holders of each weight, the optimizer.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hetrain.cluster.topology import Cluster
from hetrain.comm.groups import GroupCache, torch_backend
from hetrain.comm.p2p import P2P, tag_of
from hetrain.comm.pacing import LinkPacer
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus, load_corpus
from hetrain.model.adapters import module_spec
from hetrain.model.config import model_config
from hetrain.model.decoder import build_decoder
from hetrain.model.spec import model_spec
from hetrain.plan.schedule import Action, build_schedule
from hetrain.plan.types import Plan, StageGroup
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.emulation import Pacer
from hetrain.runtime.grad_sync import GradSync
from hetrain.runtime.memory import ActivationMeter, state_bytes
from hetrain.runtime.stage import (
    Stage,
    WholeModel,
    apply_tensor_parallel,
    decoder_stage,
    full_tensor,
)


@dataclass
class Job:
    """Everything a worker needs; pickled to each spawned process."""

    cluster: Cluster
    plan: Plan
    config: TrainConfig
    out_dir: str
    time_scale: float
    emulated: set[str]
    torch_device_of: dict[str, str] = field(default_factory=dict)  # device id -> "cuda:0"
    user_model: nn.Module | None = None
    corpus: Corpus | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    progress: object | None = None  # multiprocessing queue: rank 0 puts each step's record

    @property
    def rank_devices(self) -> list[str]:
        return self.plan.devices()


class Worker:
    def __init__(self, job: Job, rank: int):
        self.job, self.rank = job, rank
        plan, cluster = job.plan, job.cluster
        self.device_id = job.rank_devices[rank]
        self.rank_of = {d: r for r, d in enumerate(job.rank_devices)}
        self.group: StageGroup = next(g for g in plan.stage_groups if self.device_id in g.devices)
        self.tp_index = self.group.devices.index(self.device_id)
        self.kind = self.group.kind
        self.device = torch.device(job.torch_device_of.get(self.device_id, "cpu"))
        cfg = job.config
        self.cache = GroupCache(cfg.op_timeout_s)
        kinds = cluster.kinds
        self.kind_of_rank = {r: cluster.device_by_id[d].kind for d, r in self.rank_of.items()}
        self.backend_of = {
            k: torch_backend(kinds[k].backend, "cpu" if k in job.emulated else
                             job.torch_device_of.get(cluster.devices_of(k)[0].id, "cpu"))
            for k in plan.kinds()
        }
        self.corpus = job.corpus or load_corpus(cfg.data, cfg.seed)
        self._build_model()
        self.cost = CostModel(cluster, self.spec)
        # Transfers over emulated links last what the cost model gives them, as compute does.
        self.p2p = P2P(cfg.op_timeout_s, LinkPacer(cluster, self.cost, job.time_scale,
                                                   job.emulated), job.rank_devices, rank)
        self.schedule = build_schedule(plan, self.cost)
        self.actions: list[Action] = self.schedule.actions[self.group.name]
        # Every rank builds every group, in one order (torch.distributed requires it).
        self.grad_sync = GradSync(plan, self.rank_of, self.kind_of_rank, self.backend_of,
                                  self.cache, self.n_layers, self.tied)
        self.optimizer = torch.optim.AdamW(
            [p for _, _, p in self.params], lr=cfg.lr, weight_decay=cfg.weight_decay,
            foreach=False)
        self.pacer = Pacer(self.kind in job.emulated, job.time_scale)
        self.meter = ActivationMeter()
        self.events: list[dict] = []
        self.clock_offset = 0.0  # wall clock minus perf_counter, set when steps start
        self.inv_tokens = 1.0 / (plan.global_batch * plan.seq_len)

    # --- set-up ------------------------------------------------------------------------------
    def _build_model(self) -> None:
        job, g = self.job, self.group
        tp_ranks = [self.rank_of[d] for d in g.devices]
        # TP groups for every stage group, created in plan order on every rank.
        tp_groups = {sg.name: self.cache.get([self.rank_of[d] for d in sg.devices],
                                             self.backend_of[sg.kind])
                     for sg in job.plan.stage_groups}
        if job.user_model is not None:
            # Tensors pickled to spawned workers live in shared memory: without a private copy
            # every worker's optimizer would step the same weights.
            self.stage: Stage | WholeModel = WholeModel(copy.deepcopy(job.user_model))
            self.n_layers, self.tied = 1, False
            self.spec = module_spec(job.user_model, job.plan.seq_len, job.plan.model)
            self.params = [(name, 0, p) for name, p in self.stage.canonical_parameters()]
            self.dim = 0
        else:
            cfg = model_config(job.plan.model)
            full = build_decoder(cfg, job.config.seed)
            self.spec = model_spec(cfg, job.plan.seq_len)
            self.n_layers, self.tied, self.dim = len(full.layers()), cfg.tie_embeddings, cfg.dim
            self.stage = decoder_stage(full, *g.layers)
            del full
            if g.tp > 1:
                from torch.distributed.device_mesh import DeviceMesh

                mesh = DeviceMesh.from_group(tp_groups[g.name], self.device.type,
                                             mesh=torch.tensor(tp_ranks))
                apply_tensor_parallel(self.stage, mesh)
            self.params = [(name, _layer_of(name, self.n_layers), p)
                           for name, p in self.stage.canonical_parameters()]
        self.dtype = getattr(torch, job.config.precision)
        self.stage.to(device=self.device, dtype=self.dtype)

    def _peer_ranks(self, group_name: str, receiving: bool) -> list[int]:
        """Ranks of `group_name` this rank exchanges with: each receiver rank j takes from
        sender rank j mod (sender size); a sender sends to every receiver it so feeds."""
        other = self.job.plan.group_by_name[group_name]
        if receiving:
            return [self.rank_of[other.devices[self.tp_index % other.tp]]]
        return [self.rank_of[other.devices[j]] for j in range(other.tp)
                if j % self.group.tp == self.tp_index]

    # --- one step ----------------------------------------------------------------------------
    def run_step(self, step: int) -> dict:
        plan = self.job.plan
        inputs, targets = self.corpus.global_batch(step, plan.global_batch, plan.seq_len)
        stored: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        loss_sum = torch.zeros((), dtype=torch.float64)
        busy = 0.0
        t_step = time.perf_counter()
        for action in self.actions:
            mb = plan.micro_batches[action.micro_batch]
            rows = slice(mb.first_sample, mb.first_sample + mb.size)
            backward = action.op == "backward"
            t_wait = time.perf_counter()
            received = None
            if action.recv_from is not None:
                shape = (mb.size, plan.seq_len, self.dim)
                (src,) = self._peer_ranks(action.recv_from, receiving=True)
                received = self.p2p.recv(shape, src, tag_of(mb.id, backward), self.device,
                                         self.dtype)
            t0 = time.perf_counter()
            if t0 - t_wait > 1e-4:
                self._event(f"recv {'B' if backward else 'F'}{mb.id}", "comm", t_wait, t0)
            if not backward:
                x = inputs[rows].to(self.device) if received is None else received
                if received is not None:
                    x.requires_grad_(True)
                with self.meter.forward(mb.id):
                    out = self.stage(x)
                if self.stage.last:
                    out = F.cross_entropy(out.flatten(0, 1),
                                          targets[rows].flatten().to(self.device),
                                          reduction="sum") * self.inv_tokens
                    loss_sum += out.detach().double().cpu()
                stored[mb.id] = (x if received is not None else None, out)
                result = out
            else:
                x, out = stored.pop(mb.id)
                out.backward(received)
                self.meter.release(mb.id)
                result = x.grad if x is not None else None
            # An emulated kind has its result only once its paced compute is over: send after,
            # or the next stage would start before this one could have finished.
            emulated_s = self.cost.stage_compute_s(self.group, action.op, mb.size, plan.seq_len)
            self.pacer.finish(t0, emulated_s)
            if action.send_to is not None:
                for dst in self._peer_ranks(action.send_to, receiving=False):
                    self.p2p.send(result, dst, tag_of(mb.id, backward))
            t1 = time.perf_counter()
            busy += t1 - t0
            self._event(f"{'B' if backward else 'F'}{mb.id}",
                        "backward" if backward else "forward", t0, t1)
        self.p2p.wait_sends()
        t_sync = time.perf_counter()
        self.grad_sync.sync(self.params, self.tp_index, self.group.tp)
        t_opt = time.perf_counter()
        self._event("allreduce", "comm", t_sync, t_opt)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_end = time.perf_counter()
        self._event("optimizer", "optimizer", t_opt, t_end)
        # The global loss (sum over last stages, once per TP group) also ends the step for all.
        if not (self.stage.last and self.tp_index == 0):
            loss_sum.zero_()
        dist.all_reduce(loss_sum)
        return {"step": step, "loss": float(loss_sum), "step_s": time.perf_counter() - t_step,
                "busy_s": busy, "sync_s": t_opt - t_sync, "optimizer_s": t_end - t_opt}

    def _event(self, name: str, cat: str, t0: float, t1: float) -> None:
        if self.job.config.trace:
            self.events.append({"lane": self.device_id, "name": name, "category": cat,
                                "start_s": t0 + self.clock_offset, "dur_s": t1 - t0,
                                "kind": self.kind,
                                "stream": "comm" if cat == "comm" else "compute"})

    # --- results -----------------------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Whole tensors by canonical name (TP shards gathered: a collective in the group)."""
        return {name: full_tensor(p.detach()).cpu().clone() for name, _, p in self.params}

    def report(self, steps: list[dict]) -> dict:
        params = self.full_parameters()
        acts = self.meter.peak_bytes
        return {
            "rank": self.rank, "device": self.device_id, "group": self.group.name,
            "kind": self.kind, "tp_index": self.tp_index,
            "emulated": self.kind in self.job.emulated,
            "steps": steps, "params": params if self.tp_index == 0 else {},
            "samples": self.job.plan.samples_of(self.group.name),
            "layers": list(self.group.layers),
            "measured_bytes": state_bytes(self.stage, self.optimizer) + acts,
            "activation_bytes": acts,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda" else None,
            "late_s": self.pacer.late_s, "events": self.events,
            "peak_in_flight": self.schedule.peak_in_flight[self.group.name],
        }


def _layer_of(name: str, n_layers: int) -> int:
    if name.startswith("embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_layers - 1


def run_worker(job: Job, rank: int, world: int, init_method: str | None = None) -> None:
    """Process entry: init torch.distributed, train, write rank{rank}.pt (or error.txt)."""
    out = Path(job.out_dir)
    torch.set_num_threads(1)
    try:
        from datetime import timedelta

        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", rank=rank, world_size=world,
                init_method=init_method or f"tcp://{job.master_addr}:{job.master_port}",
                timeout=timedelta(seconds=job.config.op_timeout_s))
        worker = Worker(job, rank)
        from hetrain.runtime.loop import train_loop

        steps = train_loop(worker)
        report = worker.report(steps)
        tmp = out / f".rank{rank}.pt.tmp"
        torch.save(report, tmp)
        os.replace(tmp, out / f"rank{rank}.pt")
        dist.barrier()
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, then re-raised
        (out / f"error{rank}.txt").write_text(
            f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

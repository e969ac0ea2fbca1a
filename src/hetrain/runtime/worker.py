"""One worker process: builds its stage, then runs the plan's schedule step after step.

A step: the stage group's actions in schedule order (forward; whole backward under 1F1B, or
input-gradient then weight-gradient actions under zero-bubble), receiving and sending
activations and gradients; the gradient sum over all holders of each weight, overlapped on a
comm thread; the optimizer.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from hetrain.comm.bridge import pair_groups, require_bridge
from hetrain.comm.groups import GroupCache, torch_backend
from hetrain.comm.p2p import P2P, tag_of
from hetrain.comm.pacing import LinkPacer
from hetrain.cost.model import CostModel
from hetrain.data.loading import load_corpus
from hetrain.model.decoder import SequencePieces
from hetrain.model.loading import load_model
from hetrain.plan.schedule import RECV_AHEAD, Action, build_schedule
from hetrain.plan.sync import SyncBucket, ready_fraction
from hetrain.plan.types import MicroBatch, StageGroup
from hetrain.runtime.checkpoint import TrainState
from hetrain.runtime.emulation import Pacer
from hetrain.runtime.grad_sync import GradSync
from hetrain.runtime.job import Job
from hetrain.runtime.memory import ActivationMeter, PeakTracker, held_tensors, state_bytes
from hetrain.runtime.precision import loss_scaler, param_dtype, precision_of
from hetrain.runtime.recipe import StepRecipe, adamw, decays, recipe_state
from hetrain.runtime.records import StepRecord, WorkerReport
from hetrain.runtime.stage import Stage, full_tensor, settle_partial_grads
from hetrain.runtime.transfers import transfer_pairs


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
        self.precision = precision_of(cfg.precision, kinds[self.kind].flops)
        self.scaler = loss_scaler(cfg.precision, [kinds[k].flops for k in plan.kinds()],
                                  cfg.loss_scale, cfg.loss_scale_growth_interval)
        self.events: list[dict] = []
        self.clock_offset = 0.0  # wall clock minus perf_counter, set when steps start
        self._build_model()
        self.cost = CostModel(cluster, self.spec)
        # Transfers over emulated links last what the cost model gives them, as compute does.
        # Inside a kind on its own backend, between kinds over the bridge (comm/bridge.py).
        require_bridge(cluster.bridge_backend, cluster.bridge_plugin)  # imports its plugin
        routes = pair_groups(transfer_pairs(plan, self.rank_of), self.kind_of_rank,
                             self.backend_of, cluster.bridge_backend, self.cache, rank)
        self.p2p = P2P(cfg.op_timeout_s, LinkPacer(cluster, self.cost, job.time_scale,
                                                   job.emulated), job.rank_devices, rank,
                       self.device, routes)
        self.schedule = build_schedule(plan, self.cost)
        self.actions: list[Action] = self.schedule.actions[self.group.name]
        self.last_weight_grad = self.schedule.last_weight_grad(self.group.name)
        # Gradients final only when the step's compute is over (a first stage, data
        # parallelism), on a real kind: the main thread sums them itself (nothing to overlap;
        # an emulated kind's buckets keep their paced start on the comm thread).
        self.sync_inline = (self.last_weight_grad == len(self.actions) - 1
                            and self.kind not in job.emulated)
        # Every rank builds every sync group, in one order (torch.distributed requires it).
        # Their own cache: the comm thread must never share a process group with the
        # compute thread's tensor-parallel collectives.
        self.grad_sync = GradSync(plan, self.spec, self.group, self.rank_of, self.kind_of_rank,
                                  self.backend_of, GroupCache(cfg.op_timeout_s), self.params,
                                  self._adamw, cfg.op_timeout_s, self._event,
                                  cluster.bridge_backend)
        # With ZeRO-1 the gradients of shared weights are cleared by the sync once it has
        # stepped them: this optimizer then steps only weights held by one group.
        self.optimizer = self._adamw([(p, decays(p)) for _, _, p in self.params])
        self.recipe = StepRecipe(cfg, rank, self.tp_index, self.params, self.grad_sync,
                                 self._optimizers, self.device.type)
        self.pacer = Pacer(self.kind in job.emulated, job.time_scale)
        self.meter = ActivationMeter()
        self.peak: PeakTracker | None = None  # set by the loop for the step it measures
        self.inv_tokens = 1.0 / (plan.global_batch * plan.seq_len)

    def _adamw(self, params: list[tuple[torch.Tensor, bool]]) -> torch.optim.Optimizer:
        return adamw(self.job.config, params)  # (tensor, decays) pairs: runtime/recipe.py

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + [rb.optimizer for rb in self.grad_sync.mine if rb.optimizer]

    # --- set-up ------------------------------------------------------------------------------
    def _build_model(self) -> None:
        job, g = self.job, self.group
        tp_ranks = [self.rank_of[d] for d in g.devices]
        # TP groups for every stage group, created in plan order on every rank.
        tp_groups = {sg.name: self.cache.get([self.rank_of[d] for d in sg.devices],
                                             self.backend_of[sg.kind])
                     for sg in job.plan.stage_groups}
        # The model object builds this group's layers; every process the same weights.
        model = job.model if job.model is not None else load_model(job.plan.model)
        self.model = model.units(job.plan.half_layers)
        self.spec = self.model.spec(job.plan.seq_len)
        self.n_layers, self.tied = self.model.n_layers, self.model.tie_embeddings
        self.dim = self.model.hidden_size  # elements per token sent between stages
        self.stage: Stage = self.model.build_stage(*g.layers, job.config.seed)
        self.stage.recompute, self.stage.regather = g.recompute, g.regather
        if g.tp > 1:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(tp_groups[g.name], self.device.type,
                                         mesh=torch.tensor(tp_ranks))
            self.model.apply_tensor_parallel(self.stage, mesh,
                                             self.spec.sequence_parallel(g.tp))
        self.params = [(name, self.model.layer_of(name), p)
                       for name, p in self.stage.canonical_parameters()]
        self.dtype = param_dtype(job.config.precision)  # master weights
        self.act_dtype = self.precision.activation_dtype  # sent between stages
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
    def run_step(self, step: int) -> StepRecord:
        plan = self.job.plan
        # Phase 1: the step's samples, a pure function of (seed, step).
        inputs, targets = self.corpus.global_batch(step, plan.global_batch, plan.seq_len)
        st = _StepState(inputs, targets)
        t_step = time.perf_counter()
        # Phase 2: this group's actions in schedule order. After its last weight-gradient
        # action every gradient of the stage is final: the sync of its buckets starts then,
        # on the comm thread, unless that action ends the step's compute on a real kind.
        with self.precision.step_cache(self.device.type):  # one 16-bit weight copy a step
            for i, action in enumerate(self.actions):
                self._run_action(action, st, start_sync=i == self.last_weight_grad
                                 and not self.sync_inline,
                                 ahead=self.actions[i + 1:i + 1 + RECV_AHEAD])
        self.p2p.wait_sends()
        # Phase 3: wait for the sums (exposed sync only), then the optimizer. Under ZeRO-1
        # shared weights were already stepped shard by shard on the comm thread.
        t_sync = time.perf_counter()
        if self.sync_inline:
            self._settle_grads()
            self.grad_sync.run_now()
        self.grad_sync.wait()
        # fp16: a step whose gradients overflowed anywhere is skipped everywhere; else the
        # gradients are unscaled and clipped in one multiplication (the global norm when
        # clipping; ZeRO-1 pieces wait for both).
        ok = self.scaler.step_ok(self._weights(), step, self.grad_sync.deferred_sums())
        if ok:
            self.recipe.before_optimizer(self.scaler.current)
        else:
            self.grad_sync.drop_deferred()
            self.recipe.skip()
        t_opt = time.perf_counter()
        self._event("allreduce", "comm", t_sync, t_opt)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_end = time.perf_counter()
        self._event("optimizer", "optimizer", t_opt, t_end)
        # Phase 4: the global loss (sum over last stages, once per TP group); this collective
        # also ends the step for all ranks.
        if not (self.stage.last and self.tp_index == 0):
            st.loss_sum.zero_()
        sums = torch.stack([st.loss_sum, self.recipe.unreduced_norm_sq()])
        dist.all_reduce(sums)
        lr, grad_norm, clipped = self.recipe.record(float(sums[1]))
        return StepRecord(step=step, loss=float(sums[0]), step_s=time.perf_counter() - t_step,
                          busy_s=st.busy_s, sync_s=t_opt - t_sync, optimizer_s=t_end - t_opt,
                          lr=lr, grad_norm=grad_norm, clipped=clipped)

    def _unit(self, micro_batch: int, piece: int) -> int:
        """A micro-batch's sequence piece as one id (transfer tags, stored activations)."""
        return micro_batch * self.job.plan.seq_chunks + piece

    def _tag(self, action: Action) -> int:
        """The tag of the tensor the action receives or sends."""
        return tag_of(self._unit(action.micro_batch, action.chunk), action.is_backward)

    def _run_action(self, action: Action, st: _StepState, start_sync: bool,
                    ahead: list[Action]) -> None:
        plan = self.job.plan
        mb = plan.micro_batches[action.micro_batch]
        received, t0 = self._receive(action, mb)
        for nxt in ahead:  # their receives move while this action computes (as simulated)
            if nxt.recv_from is not None:
                size = plan.micro_batches[nxt.micro_batch].size
                (src,) = self._peer_ranks(nxt.recv_from, receiving=True)
                self.p2p.post((size, plan.chunk_len, self.dim), src,
                              self._tag(nxt), self.act_dtype)
        result = _COMPUTE[action.op](self, mb, action.chunk, received, st)
        # An emulated kind has its result only once its paced compute is over: send after,
        # or the next stage would start before this one could have finished.
        emulated_s = self.cost.stage_compute_s(self.group, action.op, mb.size, plan.chunk_len)
        if start_sync:
            self._settle_grads()
            self.grad_sync.launch(lambda b: self._bucket_ready_s(b, t0, emulated_s))
        self.pacer.finish(t0, emulated_s)
        if action.send_to is not None:
            for dst in self._peer_ranks(action.send_to, receiving=False):
                self.p2p.send(result, dst, self._tag(action))
        t1 = time.perf_counter()
        st.busy_s += t1 - t0
        self._event(action.label, _CATEGORY[action.op], t0, t1)

    def _settle_grads(self) -> None:
        if self.group.tp > 1:  # only TP leaves gradients partial
            settle_partial_grads(p for _, _, p in self.params)

    def _receive(self, action: Action, mb: MicroBatch) -> tuple[torch.Tensor | None, float]:
        """The activation (forward) or output gradient (backward) this action takes, if any,
        and the time it arrived."""
        t_wait = time.perf_counter()
        if action.recv_from is None:
            return None, t_wait
        shape = (mb.size, self.job.plan.chunk_len, self.dim)
        (src,) = self._peer_ranks(action.recv_from, receiving=True)
        received = self.p2p.recv(shape, src, self._tag(action), self.device, self.act_dtype)
        t0 = time.perf_counter()
        if t0 - t_wait > 1e-4:
            self._event(f"recv {action.label}", "comm", t_wait, t0)
        return received, t0

    def _bucket_ready_s(self, bucket: SyncBucket, t0: float, emulated_s: float) -> float:
        """When the bucket's gradients are final here: on an emulated kind, once the share of
        the paced action that computes them is over (backward runs from the last layer)."""
        if not self.pacer.emulated:
            return time.perf_counter()
        share = ready_fraction(self.spec, self.group, bucket)
        return t0 + share * emulated_s * self.pacer.time_scale

    # --- compute actions: each returns what the action sends (if anything) --------------------
    # `piece`: the piece of the micro-batch's sequence (Plan.seq_chunks; 0 without chunks).
    def _piece_of(self, st: _StepState, mb: MicroBatch, piece: int):  # noqa: ANN202
        """The stage's context for the micro-batch's sequence piece: the earlier pieces' keys
        and values (model.decoder.SequencePieces); a no-op without sequence chunks."""
        if self.job.plan.seq_chunks == 1:
            return nullcontext()
        pieces = st.pieces.setdefault(mb.id, SequencePieces())
        pieces.piece = piece
        return self.stage.sequence_piece(pieces)

    def _forward(self, mb: MicroBatch, piece: int, received: torch.Tensor | None,
                 st: _StepState) -> torch.Tensor:
        rows = slice(mb.first_sample, mb.first_sample + mb.size)
        size = self.job.plan.chunk_len
        cols = slice(piece * size, (piece + 1) * size)
        saved = _Saved()
        if received is None:
            x = st.inputs[rows, cols].to(self.device)
        else:
            x = saved.inp = received.requires_grad_(True)
        unit = self._unit(mb.id, piece)
        with self.meter.forward(unit):
            with self.precision.autocast(self.device.type), self._piece_of(st, mb, piece):
                out = self.stage(x)
            if self.stage.last:  # the loss in the master dtype, scaled under fp16
                out = F.cross_entropy(out.to(self.dtype).flatten(0, 1),
                                      st.targets[rows, cols].flatten().to(self.device),
                                      reduction="sum") * self.inv_tokens
                st.loss_sum += out.detach().double().cpu()
                out = self.scaler.scaled(out)
            else:  # activations travel in the compute dtype
                out = out.to(self.act_dtype)
        saved.out = out
        st.stored[unit] = saved
        return out

    def _roots(self, st: _StepState, mb: MicroBatch, saved: _Saved,
               received: torch.Tensor | None) -> tuple[list[torch.Tensor], list, list]:
        """What a backward starts from: the stage's output (the loss) and its gradient, and
        with sequence pieces the piece's keys and values with the gradients the later pieces
        left; the tensors whose gradients it builds besides the weights (the input, the
        earlier pieces' keys and values). The piece's context is dropped after piece 0, the
        last backward of the micro-batch here."""
        outputs, grads, inputs = [saved.out], [received], [saved.inp]
        pieces = st.pieces.get(mb.id)
        if pieces is not None:
            more, more_grads = pieces.roots()
            outputs += more
            grads += more_grads
            inputs += pieces.past_leaves()
            if pieces.piece == 0:
                del st.pieces[mb.id]
        return outputs, grads, inputs

    def _backward(self, mb: MicroBatch, piece: int, received: torch.Tensor | None,
                  st: _StepState) -> torch.Tensor | None:
        """1F1B: input and weight gradients in one pass."""
        unit = self._unit(mb.id, piece)
        saved = st.stored.pop(unit)
        with self._piece_of(st, mb, piece):  # a recomputed forward reads the same past
            outputs, grads, _ = self._roots(st, mb, saved, received)
            torch.autograd.backward(outputs, grads)
        self.meter.release(unit)
        return saved.inp.grad if saved.inp is not None else None

    def _backward_input(self, mb: MicroBatch, piece: int, received: torch.Tensor | None,
                        st: _StepState) -> torch.Tensor | None:
        """Zero-bubble: the input gradient only; the graph pieces the weight gradients need
        stay with the micro-batch (torch.distributed.pipelining's split backward). Only groups
        after the first that do not recompute split (plan.schedule.splits_backward): there is
        always an input, and no checkpointed layer to run again in each action."""
        saved = st.stored[self._unit(mb.id, piece)]
        self.stage.input_grad_pass = True  # no regather: the weight action reads the inputs
        try:
            with self._piece_of(st, mb, piece):
                outputs, grads, inputs = self._roots(st, mb, saved, received)
            if received is None:  # the loss: its own gradient is 1
                grads[0] = torch.ones_like(saved.out)
            grads, saved.param_groups = stage_backward_input(outputs, grads, inputs,
                                                             self._weights())
        finally:
            self.stage.input_grad_pass = False
        return grads[0]

    def _backward_weight(self, mb: MicroBatch, piece: int, received: torch.Tensor | None,
                         st: _StepState) -> None:
        """Zero-bubble: the micro-batch's weight gradients, accumulated into .grad."""
        unit = self._unit(mb.id, piece)
        saved = st.stored.pop(unit)
        stage_backward_weight(self._weights(), saved.param_groups)
        self.meter.release(unit)
        return None

    def state_tensors(self) -> list[torch.Tensor]:
        """What this worker keeps between steps (runtime/memory.py counts it as held)."""
        return held_tensors(self.stage, self.optimizer) + self.grad_sync.state_tensors()

    def _weights(self) -> list[nn.Parameter]:
        return [p for _, _, p in self.params]

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

    def train_state(self) -> TrainState:
        """What checkpoints save and restore of this rank (runtime/checkpoint.py)."""
        cfg = self.job.config
        return TrainState(rank=self.rank, rank_devices=self.job.rank_devices, plan=self.job.plan,
                          group=self.group.name, tp_index=self.tp_index, params=self.params,
                          optimizer=self.optimizer, grad_sync=self.grad_sync, seed=cfg.seed,
                          precision=cfg.precision, run_id=cfg.run_id,
                          recipe=recipe_state(cfg), scaler=self.scaler)

    def report(self, steps: list[StepRecord]) -> WorkerReport:
        params = self.full_parameters()
        acts = self.meter.peak_bytes
        return WorkerReport(
            rank=self.rank, device=self.device_id, group=self.group.name,
            kind=self.kind, tp_index=self.tp_index,
            emulated=self.kind in self.job.emulated,
            steps=steps, params=params if self.tp_index == 0 else {},
            samples=self.job.plan.samples_of(self.group.name),
            layers=list(self.group.layers),
            measured_bytes=self.peak.peak_bytes if self.peak is not None
            else state_bytes(self.stage, self.optimizer) + self.grad_sync.state_bytes() + acts,
            optimizer_bytes=state_bytes(nn.Module(), self.optimizer)
            + self.grad_sync.state_bytes(),
            activation_bytes=acts,
            cuda_peak_bytes=torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda" else None,
            late_s=self.pacer.late_s, events=self.events,
            dtype=self.precision.catalog_dtype, skipped_steps=self.scaler.skipped,
            memory_source=self.peak.source if self.peak is not None else "estimate",
            peak_in_flight=self.schedule.peak_in_flight[self.group.name],
        )


@dataclass
class _Saved:
    """What a micro-batch's forward keeps for its backward action(s)."""

    out: torch.Tensor | None = None  # stage output (the loss on the last stage)
    inp: torch.Tensor | None = None  # leaf whose gradient is sent back (None: token input)
    param_groups: list | None = None  # split backward: what the weight gradients need


@dataclass
class _StepState:
    inputs: torch.Tensor
    targets: torch.Tensor
    stored: dict[int, _Saved] = field(default_factory=dict)  # by micro-batch x chunks + piece
    pieces: dict[int, SequencePieces] = field(default_factory=dict)  # by micro-batch
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    busy_s: float = 0.0


_COMPUTE = {"forward": Worker._forward, "backward": Worker._backward,
            "backward_input": Worker._backward_input, "backward_weight": Worker._backward_weight}
_CATEGORY = {"forward": "forward", "backward": "backward", "backward_input": "backward",
             "backward_weight": "weight"}

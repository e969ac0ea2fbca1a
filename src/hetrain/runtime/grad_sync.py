"""Exact gradient combination, overlapped with backward, as plan/sync.py defines it: every
bucket of `sync_buckets` is summed over its holders by the collectives of `reductions`, in the
global bucket order, each a sharded sum (comm/sharded.py). Each micro-batch's loss is already
divided by the global token count, so the sum is the gradient of the global mean loss.

A rank's buckets run on its own comm thread, started once its group's last weight-gradient
action of the step is done (not before the share of that action that finalises the bucket
would have run on the emulated kind); the main thread waits only before the optimizer. When
that action is the step's last on a real kind, nothing is left to overlap: the main thread
sums the buckets itself (run_now), without the hand-off.

Holders of one TP degree sum shard by shard (tp rank j with tp rank j). Holders of different
degrees meet on full tensors: each rank writes its shard into zeros (replicated weights
divided by the degree), sums, and keeps its shard.

ZeRO-1 (`plan.sharded_optimizer`): a rank keeps AdamW state only for its pieces of the flat
buckets it sums (comm.sharded.FlatLayout), steps them right after their sum, and the updated
parameters are gathered instead of the gradients. AdamW is elementwise, so this is exact
(pieces are cut where weight decay starts or stops applying). With gradient clipping on
(`defer_zero`), the step of the pieces waits for the global norm (runtime/recipe.py):
`finish_deferred` runs it once the norm is known.

Each bucket also adds the squares of the summed gradient elements this rank owns to
`norm_sq` (each element owned once over all members: the global norm counts it once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate

from hetrain.comm.groups import GroupCache
from hetrain.comm.overlap import CommThread
from hetrain.comm.sharded import FlatLayout, ShardedSum
from hetrain.errors import RuntimeFailure
from hetrain.model.spec import ModelSpec
from hetrain.plan.sync import (
    SyncBucket,
    reductions,
    shard_bounds,
    sync_buckets,
    tied_last,
)
from hetrain.plan.types import Plan, StageGroup

ADAM_STATE = ("exp_avg", "exp_avg_sq")


@dataclass
class RankBucket:
    """A bucket this rank sums: its parameters (sorted by canonical name, so every member
    flattens the same tensors in one order) and its collective."""

    bucket: SyncBucket
    params: list[tuple[str, nn.Parameter]]
    collective: ShardedSum
    full_mode: bool
    tp_group: object | None = None  # full mode + ZeRO: gathers full parameter values
    pieces: list[tuple[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    norm_ranges: list[tuple[int, int]] = field(default_factory=list)  # elements it counts
    deferred: torch.Tensor | None = None  # ZeRO + clipping: summed gradients awaiting the norm


class GradSync:
    """Built on every rank in one order (group creation), run by members only."""

    def __init__(self, plan: Plan, spec: ModelSpec, group: StageGroup, rank_of: dict[str, int],
                 kind_of_rank: dict[int, str], backend_of: dict[str, str], cache: GroupCache,
                 params: list[tuple[str, int, nn.Parameter]], make_optimizer,
                 timeout_s: float, event: Callable[[str, str, float, float], None],
                 bridge_backend: str = "gloo"):
        self.plan, self.group, self.timeout_s, self.event = plan, group, timeout_s, event
        self.rank = dist.get_rank()
        self.tp = group.tp
        self.tp_index = group.devices.index(next(d for d in group.devices
                                                 if rank_of[d] == self.rank))
        self.buckets = sync_buckets(plan, spec)
        self.holders = {layer: plan.gradient_holders(layer, tied_last(spec))
                        for layer in range(spec.n_layers)}
        mine = self._my_params(params)
        numel = _agree_on_sizes(self._sizes(mine))
        self.mine: list[RankBucket] = []
        weight_of = {rank_of[d]: g.shard_weight for g in plan.stage_groups for d in g.devices}
        for bucket in self.buckets:
            full_mode = not bucket.same_tp
            for i, devices in enumerate(reductions(plan, bucket)):
                ranks = tuple(rank_of[d] for d in devices)
                layout = FlatLayout.build(ranks, kind_of_rank, weight_of, numel[bucket.index, i],
                                          shard_bounds)
                collective = ShardedSum(layout, backend_of, bridge_backend)
                collective.build(cache)
                if self.rank in ranks:
                    self.mine.append(RankBucket(bucket, mine[bucket.index], collective,
                                                full_mode))
            if full_mode and plan.sharded_optimizer:
                # ZeRO on full tensors: each holder's TP group assembles whole parameters.
                for name in bucket.holders:
                    tp_group = cache.get([rank_of[d] for d in plan.group_by_name[name].devices])
                    if name == group.name and self.mine and self.mine[-1].bucket is bucket:
                        self.mine[-1].tp_group = tp_group
        self.zero = plan.sharded_optimizer
        for rb in self.mine:
            rb.norm_ranges = self._norm_ranges(rb)
        if self.zero:
            for rb in self.mine:
                self._make_pieces(rb, make_optimizer)
        self.defer_zero = False  # set per step by the recipe (clipping on)
        self.norm_sq = 0.0  # this rank's share of the squared global norm, this step
        self.zero_params = {id(p) for rb in self.mine for _, p in rb.params} if self.zero \
            else set()
        self.zero_steps = 0
        self.thread = CommThread() if self.mine else None
        self.pending: list[Future] = []

    # --- set-up ------------------------------------------------------------------------------
    def _my_params(self, params) -> dict[int, list[tuple[str, nn.Parameter]]]:
        out: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for bucket in self.buckets:
            if self.group.name not in bucket.holders:
                continue
            out[bucket.index] = sorted(((n, p) for n, layer, p in params
                                        if layer in bucket.layer_list), key=lambda x: x[0])
        return out

    def _sizes(self, mine) -> dict[tuple[int, int], int]:
        """Elements of this rank's flat buffer for each bucket it is in."""
        sizes = {}
        for bucket in self.buckets:
            if bucket.index not in mine:
                continue
            sets = reductions(self.plan, bucket)
            i = next(i for i, s in enumerate(sets) if self.group.devices[self.tp_index] in s)
            full = not bucket.same_tp
            sizes[bucket.index, i] = sum(p.numel() if full else _local(p).numel()
                                         for _, p in mine[bucket.index])
        return sizes

    def _spans(self, rb: RankBucket) -> list[tuple[int, int, nn.Parameter]]:
        """Each parameter's [start, end) in the bucket's flat buffer."""
        spans, offset = [], 0
        for _, p in rb.params:
            n = p.numel() if rb.full_mode else _local(p).numel()
            spans.append((offset, offset + n, p))
            offset += n
        return spans

    def _norm_ranges(self, rb: RankBucket) -> list[tuple[int, int]]:
        """Elements whose squares this rank adds to the norm: its owned pieces, less (shard
        by shard, TP rank > 0) replicated weights, which TP rank 0's collective counts."""
        skip_replicas = not rb.full_mode and self.tp > 1 and self.tp_index > 0
        counted = [(a, b) for a, b, p in self._spans(rb) if not (skip_replicas and
                                                                   _replicated(p))]
        return _intersect(rb.collective.layout.zero_pieces(self.rank), counted)

    def _make_pieces(self, rb: RankBucket, make_optimizer) -> None:
        from hetrain.runtime.recipe import decays

        flat = self._flat_params(rb, gather=False)
        decayed = [(a, b) for a, b, p in self._spans(rb) if decays(p)]
        plain = [(a, b) for a, b, p in self._spans(rb) if not decays(p)]
        owned = rb.collective.layout.zero_pieces(self.rank)
        # Pieces cut where weight decay starts or stops: one AdamW group each.
        cuts = sorted([(r, True) for r in _intersect(owned, decayed)]
                      + [(r, False) for r in _intersect(owned, plain)])
        rb.pieces = [((a, b), flat[a:b].clone().requires_grad_(True)) for (a, b), _ in cuts]
        if rb.pieces:
            rb.optimizer = make_optimizer([(t, d) for (_, t), (_, d) in
                                           zip(rb.pieces, cuts, strict=True)])

    def synced_params(self) -> set[int]:
        """ids of the parameters whose gradient squares the buckets count."""
        return {id(p) for rb in self.mine for _, p in rb.params}

    # --- one step ----------------------------------------------------------------------------
    def launch(self, ready_at_s: Callable[[SyncBucket], float]) -> None:
        """Queue this rank's buckets (its gradients are final), each not before its time."""
        for rb in self.mine:
            self.pending.append(self.thread.submit(
                lambda rb=rb, at=ready_at_s(rb.bucket): self._run_bucket(rb, at)))

    def run_now(self) -> None:
        """Sum this rank's buckets on the calling thread, in the global order: when the
        gradients are final only at the end of the step's compute, there is nothing to
        overlap, and the hand-off to the comm thread (and its return) would be pure cost.
        The comm thread is idle then (launch() was not called this step), so its process
        groups see one order."""
        for rb in self.mine:
            self._run_bucket(rb, 0.0)

    def wait(self) -> None:
        """Block until every queued bucket is summed (and, ZeRO, stepped)."""
        try:
            for fut in self.pending:
                fut.result(timeout=self.timeout_s)
        except TimeoutError:
            raise RuntimeFailure(f"gradient sync did not finish in {self.timeout_s:.0f} s") \
                from None
        finally:
            self.pending.clear()
        if self.zero and self.mine and all(rb.deferred is None for rb in self.mine):
            self.zero_steps += 1

    def _run_bucket(self, rb: RankBucket, ready_at_s: float) -> None:
        delay = ready_at_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        grads = self._flat_grads(rb)
        if self.zero:
            rb.collective.reduce_scatter(grads)
            rb.collective.cross_kind(grads)
            self._add_norm_sq(rb, grads)
            if self.defer_zero:  # the step waits for the global norm (finish_deferred)
                rb.deferred = grads
                for _, p in rb.params:
                    p.grad = None
            else:
                self._zero_step(rb, grads)
        else:
            rb.collective.sum(grads)
            self._add_norm_sq(rb, grads)
            self._write_grads(rb, grads)
        self.event(f"sync b{rb.bucket.index}", "comm", t0, time.perf_counter())

    def _add_norm_sq(self, rb: RankBucket, grads: torch.Tensor) -> None:
        for a, b in rb.norm_ranges:
            part = grads[a:b]  # the master dtype (fp32 or fp64): one BLAS dot, no copy
            self.norm_sq += float(torch.dot(part, part))

    def deferred_sums(self) -> list[torch.Tensor]:
        """ZeRO-1 sums waiting for their step (clipping or loss scaling)."""
        return [rb.deferred for rb in self.mine if rb.deferred is not None]

    def drop_deferred(self) -> None:
        """A step skipped on overflow: its waiting sums are dropped."""
        for rb in self.mine:
            rb.deferred = None

    def finish_deferred(self, coef: float) -> None:
        """ZeRO + clipping or loss scaling: step every bucket's pieces with gradients times
        `coef`, in the global bucket order, on the comm thread (it owns the sync's process
        groups); nothing when no sum waits."""
        todo = [rb for rb in self.mine if rb.deferred is not None]
        if not todo:
            return  # (wait() would count a ZeRO step a second time)
        for rb in todo:
            self.pending.append(self.thread.submit(
                lambda rb=rb: self._zero_step(rb, rb.deferred, coef)))
        self.wait()

    def _zero_step(self, rb: RankBucket, grads: torch.Tensor, coef: float = 1.0) -> None:
        """Step this rank's pieces (their gradients summed in `grads`), gather the updated
        parameters."""
        rb.deferred = None
        flat = self._flat_params(rb, gather=True)
        for (a, b), t in rb.pieces:
            t.data.copy_(flat[a:b])
            t.grad = grads[a:b] * coef if coef != 1.0 else grads[a:b]  # AdamW only reads it
        if rb.optimizer is not None:
            rb.optimizer.step()
        for (a, b), t in rb.pieces:
            flat[a:b].copy_(t.detach())
            t.grad = None
        rb.collective.gather_pieces(flat)
        rb.collective.all_gather(flat)
        with torch.no_grad():
            for (_, p), value in zip(rb.params, self._unflatten(rb, flat), strict=True):
                _local(p).copy_(_shard_of(value, p) if rb.full_mode else value)
                p.grad = None

    # --- flat buffers --------------------------------------------------------------------------
    def _flat_grads(self, rb: RankBucket) -> torch.Tensor:
        tensors = []
        for _, p in rb.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tensors.append(_embed_full(p.grad, self.tp) if rb.full_mode else _local(p.grad))
        return _flat_copy(tensors)

    def _write_grads(self, rb: RankBucket, flat: torch.Tensor) -> None:
        for (_, p), value in zip(rb.params, self._unflatten(rb, flat), strict=True):
            _local(p.grad).copy_(_shard_of(value, p.grad) if rb.full_mode else value)

    def _unflatten(self, rb: RankBucket, flat: torch.Tensor) -> list[torch.Tensor]:
        like = [torch.empty(p.shape, dtype=p.dtype, device=flat.device) if rb.full_mode
                else _local(p) for _, p in rb.params]
        return list(_unflatten_dense_tensors(flat, like))

    def _flat_params(self, rb: RankBucket, gather: bool) -> torch.Tensor:
        """Parameter values in the bucket's flat layout. Full mode: whole tensors, gathered
        from the TP group (`gather`; at set-up only the shapes matter)."""
        with torch.no_grad():
            if not rb.full_mode:
                return _flat_copy([_local(p.detach()) for _, p in rb.params])
            fulls = [_embed_param(p.detach(), self.tp_index) for _, p in rb.params]
            flat = _flat_copy(fulls)
            if gather and rb.tp_group is not None:
                host = flat.cpu() if flat.device.type != "cpu" else flat
                dist.all_reduce(host, group=rb.tp_group)
                flat.copy_(host)
            return flat

    # --- optimizer state (checkpoints) ---------------------------------------------------------
    def gathered_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """ZeRO: every bucket parameter's whole AdamW state (collective among members, in the
        global order), keyed by id(parameter): DTensors under TP shard-wise, else tensors."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        if not self.zero:
            return out
        step = torch.tensor(float(self.zero_steps), dtype=_scalar_dtype())
        for rb in self.mine:
            flats = {}
            for key in ADAM_STATE:
                flat = torch.zeros(rb.collective.layout.numel, dtype=rb.params[0][1].dtype,
                                   device=_local(rb.params[0][1]).device)
                for (a, b), t in rb.pieces:
                    state = rb.optimizer.state.get(t, {}) if rb.optimizer else {}
                    if key in state:
                        flat[a:b] = state[key]
                rb.collective.sum(flat)  # each element is non-zero on one rank: an assembly
                flats[key] = self._unflatten(rb, flat)
            if self.zero_steps == 0:
                continue
            for i, (_, p) in enumerate(rb.params):
                slot = {"step": step.clone()}
                for key in ADAM_STATE:
                    value = flats[key][i]
                    if isinstance(p, DTensor) and not rb.full_mode:
                        value = DTensor.from_local(value, p.device_mesh, p.placements,
                                                   run_check=False)
                    slot[key] = value
                out[id(p)] = slot
        return out

    def load_state(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """ZeRO: fill each piece's AdamW state from whole per-parameter state (full-shape
        tensors keyed by id(parameter)), as the checkpoint stores it."""
        for rb in self.mine:
            if id(rb.params[0][1]) not in states:
                continue
            step = states[id(rb.params[0][1])]["step"]
            self.zero_steps = int(step)
            if rb.optimizer is None:
                continue
            flats = {}
            for key in ADAM_STATE:
                parts = [states[id(p)][key] if rb.full_mode else _shard_of(
                    states[id(p)][key], p) for _, p in rb.params]
                flats[key] = _flatten_dense_tensors(parts)
            for (a, b), t in rb.pieces:
                rb.optimizer.state[t] = {"step": step.clone().to(_scalar_dtype()),
                                         **{k: flats[k][a:b].clone().to(t.device)
                                            for k in ADAM_STATE}}

    def state_tensors(self) -> list[torch.Tensor]:
        """ZeRO: the pieces this rank steps and their AdamW state (runtime/memory.py)."""
        out = []
        for rb in self.mine:
            out += [t for _, t in rb.pieces]
            if rb.optimizer is not None:
                out += [v for st in rb.optimizer.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor)]
        return out

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for rb in self.mine if rb.optimizer
                   for s in rb.optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def close(self) -> None:
        if self.thread is not None:
            self.thread.close()


def _intersect(ranges: list[tuple[int, int]], others: list[tuple[int, int]]
               ) -> list[tuple[int, int]]:
    """Non-empty overlaps of two lists of [start, end) ranges."""
    out = []
    for a, b in ranges:
        for c, d in others:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((lo, hi))
    return sorted(out)


def _agree_on_sizes(mine: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """Every rank learns every collective's buffer size (the layouts and groups depend on it)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    sizes: dict[tuple[int, int], int] = {}
    for theirs in everyone:
        for key, n in theirs.items():
            if sizes.setdefault(key, n) != n:
                raise RuntimeFailure(f"gradient bucket {key[0]}: members disagree on its size "
                                     f"({sizes[key]} vs {n} elements)")
    return sizes


def _flat_copy(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated into a new 1-D buffer (flattening one tensor is a view)."""
    flat = _flatten_dense_tensors(tensors)
    return flat.clone() if len(tensors) == 1 else flat


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _slices(t: DTensor) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def _replicated(t: torch.Tensor) -> bool:
    return not isinstance(t, DTensor) or all(isinstance(pl, Replicate) for pl in t.placements)


def _embed_full(grad: torch.Tensor, tp: int) -> torch.Tensor:
    """A gradient as a full tensor whose sum over the TP group is the group's gradient."""
    if _replicated(grad):
        return _local(grad) / tp if tp > 1 else _local(grad).clone()
    full = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.to_local().device)
    full[_slices(grad)] = grad.to_local()
    return full


def _embed_param(p: torch.Tensor, tp_index: int) -> torch.Tensor:
    """A parameter as a full tensor whose sum over the TP group is its value."""
    if _replicated(p):
        return _local(p).clone() if tp_index == 0 else torch.zeros_like(_local(p))
    full = torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device)
    full[_slices(p)] = p.to_local()
    return full


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return full if _replicated(like) else full[_slices(like)]

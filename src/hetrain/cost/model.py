"""CostModel: compute time of a layer range on a kind, transfer times, memory of a stage.

Compute comes from a roofline over the catalog (peak FLOP/s x the kind's efficiency, and the
memory-bandwidth floor of reading the weights), or from a measured profile when one is given.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Protocol

import numpy as np

from hetrain.cluster.kinds import DTYPE_BYTES
from hetrain.cluster.topology import Cluster
from hetrain.errors import CostError
from hetrain.model.spec import ModelSpec

Op = Literal["forward", "backward", "backward_input", "backward_weight"]
# A backward splits evenly: the input gradient costs one forward's matmuls, the weight
# gradient the other (zero-bubble schedules run them as two actions).
SPLIT_BACKWARD = {"backward": 1.0, "backward_input": 0.5, "backward_weight": 0.5}


def ring_allreduce_s(n: int, nbytes: float, gbps: float, latency_s: float) -> float:
    """Reduce then broadcast among `n` ranks of one kind over links of `gbps`: each rank moves
    (n-1)/n of the buffer per phase, and each phase pays n-1 latencies."""
    if n < 2 or nbytes <= 0:
        return 0.0
    return 2 * ((n - 1) / n * nbytes / (gbps * 1e9) + (n - 1) * latency_s)


class GroupLike(Protocol):
    """The fields of plan.StageGroup the cost model reads (cost does not import plan)."""

    kind: str
    layers: tuple[int, int]
    dtype: str
    recompute: bool
    regather: bool
    devices: list[str]


# How a stage group trades time for memory: the index of the StageTables variants.
PLAIN, RECOMPUTE, REGATHER = 0, 1, 2


def memory_mode(group: GroupLike) -> int:
    """The group's variant: recomputation wins over regathering."""
    return RECOMPUTE if group.recompute else REGATHER if group.regather else PLAIN


def tp_comm_passes(op: Op, sequence_parallel: bool, mode: int) -> float:
    """An action's collectives inside its tensor-parallel group, in forward passes' worth
    (per matmul pair one all-reduce, or under sequence parallelism an all-gather and a
    reduce-scatter): backward sums the input gradients as forward summed the outputs;
    recomputation runs forward's again; regathering (sequence parallelism only) gathers the
    saved shard of the matmuls' input again, half a pass, in the backward action that reads
    its values: a whole backward, or a split one's weight-gradient action (the input
    gradients read only its layout). The weight-gradient action moves no activation
    gradient."""
    if op == "forward":
        return 1.0
    regather = 0.5 if sequence_parallel and mode == REGATHER else 0.0
    if op == "backward_weight":
        return regather
    recompute = 1.0 if mode == RECOMPUTE else 0.0
    if op == "backward_input":
        return 1.0 + recompute
    return 1.0 + recompute + regather


class CostModel:
    def __init__(self, cluster: Cluster, spec: ModelSpec, profile: Any | None = None):
        self.cluster = cluster
        self.spec = spec
        # cost.profile.Profile: measured seconds per token per layer, per (tp, micro-batch)
        self.profile = profile
        self._halves: CostModel | None = None

    def units(self, half_layers: bool) -> CostModel:
        """This cost model over the partition units a plan counts (Plan.half_layers): the
        model's half layers (ModelSpec.halves), a measured profile's blocks split between
        their halves by FLOPs. PlanError where the model has none."""
        spec = self.spec.units(half_layers)
        if spec is self.spec:
            return self
        if self._halves is None:
            out = copy.copy(self)
            out.spec, out._halves = spec, None
            if self.profile is not None:
                out.profile = self.profile.in_halves(spec)
            self._halves = out
        return self._halves

    # --- compute -----------------------------------------------------------------------------
    def layers_compute_s(self, kind: str, layers: tuple[int, int], tokens: float, op: Op,
                         dtype: str = "bf16", tp: int = 1, mode: int = PLAIN) -> float:
        """Seconds for one device of a `tp`-way group to run `op` over `tokens` tokens, in
        memory mode `mode` (PLAIN, RECOMPUTE, REGATHER)."""
        recompute = mode == RECOMPUTE
        if kind not in self.cluster.kinds:
            raise CostError(f"unknown kind {kind!r}")
        start, end = layers
        comm = self.tp_comm_s(kind, layers, tokens, dtype, tp)
        passes = tp_comm_passes(op, self.spec.sequence_parallel(tp), mode)
        if self.profile is not None and self.profile.has(kind):
            fwd = self.profile.forward_s(kind, start, end, tokens, tp)
            bwd = self.profile.backward_s(kind, start, end, tokens, tp)
            if self.profile.measured_tp(kind, tp):
                comm = 0.0  # measured on a tp-way group: its all-reduces are in the figures
        else:
            fwd, bwd = self._roofline_s(kind, start, end, tokens, dtype, tp)
        if op == "forward":
            return fwd + comm
        compute = bwd * SPLIT_BACKWARD[op]
        if op == "backward_weight":
            return compute + passes * comm
        # recomputation rebuilds the activations before the input gradient
        return compute + (fwd if recompute else 0.0) + passes * comm

    def _roofline_s(self, kind_name: str, start: int, end: int, tokens: float, dtype: str,
                    tp: int) -> tuple[float, float]:
        kind = self.cluster.kinds[kind_name]
        if not kind.supports(dtype) and not (dtype == "fp32" and "tf32" in kind.flops):
            raise CostError(f"{kind_name} does not compute in {dtype}")
        rate = kind.peak_flops(dtype) * kind.efficiency * tp
        fwd_flops = tokens * sum(lay.forward_flops_per_token for lay in self.spec.layers[start:end])
        weight_bytes = self.spec.range_params(start, end) * DTYPE_BYTES[dtype] / tp
        floor = weight_bytes / (kind.memory_bandwidth_gbps * 1e9)
        return max(fwd_flops / rate, floor), max(2 * fwd_flops / rate, 2 * floor)

    def tp_comm_s(self, kind: str, layers: tuple[int, int], tokens: float, dtype: str,
                  tp: int) -> float:
        """Ring all-reduces of the activations inside a tensor-parallel group, per pass."""
        if tp <= 1:
            return 0.0
        start, end = layers
        count = sum(lay.tp_allreduces for lay in self.spec.layers[start:end])
        bytes_each = tokens * self.spec.dim * DTYPE_BYTES[dtype]
        bw = self.cluster.kinds[kind].intra_node_gbps * 1e9
        return count * 2 * (tp - 1) / tp * bytes_each / bw

    def stage_compute_s(self, group: GroupLike, op: Op, samples: int, seq_len: int) -> float:
        """Duration of one schedule action (plan.schedule.StageCost)."""
        return self.layers_compute_s(group.kind, tuple(group.layers), samples * seq_len, op,
                                     group.dtype, len(group.devices), memory_mode(group))

    def tokens_per_s(self, kind: str, dtype: str | None = None, tokens: float = 8192) -> float:
        """Training throughput of one device of `kind` holding the whole model, over passes of
        `tokens` tokens (the weight-reading floor is paid once per pass)."""
        dtype = dtype or self.cluster.kinds[kind].best_dtype()
        layers = (0, self.spec.n_layers)
        step = sum(self.layers_compute_s(kind, layers, tokens, op, dtype)
                   for op in ("forward", "backward"))
        return tokens / step

    # --- transfers ---------------------------------------------------------------------------
    def p2p_s(self, src_device: str, dst_device: str, nbytes: float) -> float:
        if src_device == dst_device:
            return 0.0
        bw = self.cluster.link_gbps(src_device, dst_device) * 1e9
        return self.cluster.link_latency_s(src_device, dst_device) + nbytes / bw

    def p2p_handshake_s(self, src_device: str, dst_device: str) -> float:
        """A receive posted after its send still waits this long before the bytes move: the
        runtime's transfers (gloo) start once the receiver's ready notice, a message of no
        bytes, reaches the sender."""
        return self.p2p_s(dst_device, src_device, 0.0)

    def activation_bytes(self, layer_end: int, samples: int, dtype: str) -> float:
        """Bytes sent from a stage ending at `layer_end` for one micro-batch."""
        per_token = self.spec.layers[layer_end - 1].output_elems_per_token
        return per_token * samples * self.spec.seq_len * DTYPE_BYTES[dtype]

    def ring_gbps(self, devices: list[str]) -> float:
        """Slowest link of a ring over `devices` (GB/s)."""
        if len(devices) < 2:
            return float("inf")
        return min(self.cluster.link_gbps(a, b)
                   for a, b in zip(devices, devices[1:] + devices[:1], strict=True))

    def sync_s(self, devices: list[str], nbytes: float) -> float:
        """Sharded sum of `nbytes` over `devices` (plan.sync prices every gradient bucket with
        it; comm/ runs it): reduce-scatter inside each kind on its native backend, then each
        rank sums its shard with one peer of every other kind over the host bridge, then
        all-gather inside each kind. Every device's links carry about 1/n of the bytes, n the
        devices of its kind; the kind with the fewest devices bounds the bridge phase."""
        if len(devices) < 2 or nbytes <= 0:
            return 0.0
        by_kind: dict[str, list[str]] = {}
        for d in devices:
            by_kind.setdefault(self.cluster.device_by_id[d].kind, []).append(d)
        intra = 0.0
        for members in by_kind.values():
            if len(members) > 1:
                lat = max(self.cluster.link_latency_s(members[0], m) for m in members[1:])
                intra = max(intra, ring_allreduce_s(len(members), nbytes,
                                                    self.ring_gbps(members), lat))
        k = len(by_kind)
        if k < 2:
            return intra
        shard = nbytes / min(len(m) for m in by_kind.values())
        leaders = [m[0] for m in by_kind.values()]
        lat = max(self.cluster.link_latency_s(leaders[0], x) for x in leaders[1:])
        bw = min(self.ring_gbps(leaders), self.cluster.links.bridge_gbps) * 1e9
        return intra + 2 * (k - 1) / k * shard / bw + 2 * (k - 1) * lat

    def bridge_allreduce_s(self, parties: int, nbytes: float) -> float:
        """Ring all-reduce among `parties` leaders over the host-memory bridge (the planner's
        model of the exchange between differently shaped pipelines, whatever their kinds)."""
        if parties < 2 or nbytes <= 0:
            return 0.0
        links = self.cluster.links
        bw = min(links.bridge_gbps, links.inter_node_gbps) * 1e9
        lat = links.inter_node_latency_us * 1e-6
        return 2 * (parties - 1) / parties * nbytes / bw + 2 * (parties - 1) * lat

    def optimizer_s(self, kind: str, params: float) -> float:
        """AdamW: reads and writes weights, gradients and two moments (fp32): ~28 bytes/param."""
        return params * 28 / (self.cluster.kinds[kind].memory_bandwidth_gbps * 1e9)

    # --- memory ------------------------------------------------------------------------------
    def stage_memory_bytes(self, group: GroupLike, micro_batch_size: int, in_flight: int,
                           optimizer_params: float | None = None,
                           sync_bytes: float | None = None,
                           single_backward: bool = False, pieces: int = 1) -> float:
        """Peak bytes per device, as the runtime allocates them (runtime/memory.py measures
        it): model states, plus the larger of the activation phase (the micro-batches the
        schedule keeps, backward's working set, the tensors crossing to the neighbours) and
        the gradient-sync phase (`sync_bytes`, the bucket buffers of plan.sync; default: a
        bound from the stage's size). `optimizer_params`: parameters this device steps (all
        its own by default; fewer with a sharded optimizer).

        `single_backward`: the group runs one micro-batch a step (the sum over the routes
        through it) and its backward in one pass (not split: plan.schedule.splits_backward).
        Gradients are freed after each optimizer step and built again by backward. A group
        that runs several micro-batches holds all of them while a later one's activations
        are kept, so the states count them in both phases (the default, also the safe side
        when the count is not known); one backward a step never holds all its gradients with
        all its activations (one_backward_bytes_peak prices what it holds at once), only
        with the sync buffers.
        A split backward (zero-bubble) keeps its input-gradient pass's tensors while the
        weight pass builds the gradients (measured up to 9 % above that bound): it stays
        priced as several. `pieces`: each micro-batch's sequence in that many pieces
        (Plan.seq_chunks), `in_flight` then counting whole micro-batches' worth."""
        states = self.state_bytes(group, optimizer_params)
        if sync_bytes is None:
            sync_bytes = float(sync_bound_bytes(self.device_params(group), group.dtype,
                                                optimizer_params is not None))
        if single_backward:
            grads = self.gradient_bytes(group)
            peak = states - grads + max(self.one_backward_bytes_peak(group, micro_batch_size),
                                        grads + sync_bytes)
        else:
            peak = states + max(self.activation_bytes_peak(group, micro_batch_size, in_flight,
                                                           pieces), sync_bytes)
        return peak * (1 + UNMODELLED_FRACTION) + self.fixed_overhead_bytes(group.kind)

    def fixed_overhead_bytes(self, kind: str) -> float:
        """What a device holds whatever the stage: the small tensors no formula follows,
        and on an accelerator the workspaces its libraries take from torch's allocator."""
        device_type = self.cluster.kinds[kind].device_type
        return UNMODELLED_BYTES + (0.0 if device_type == "cpu" else LIBRARY_WORKSPACE_BYTES)

    def device_params(self, group: GroupLike) -> float:
        """Parameters one device holds: tensor parallelism splits the matmuls only."""
        return self.spec.device_params(*group.layers, len(group.devices))

    def state_bytes(self, group: GroupLike, optimizer_params: float | None = None) -> float:
        """Weights and gradients in the master dtype (fp32 under mixed precision: autocast
        keeps them so) and one 16-bit copy of the weights per step under mixed precision;
        two Adam moments of the stepped parameters in the master dtype, and when a sharded
        optimizer leaves it fewer to step a master copy of them (the pieces it steps)."""
        params = self.device_params(group)
        wbytes = DTYPE_BYTES[group.dtype]
        master = max(wbytes, 4)
        stepped = params if optimizer_params is None else optimizer_params
        # ZeRO-1 steps master-dtype copies of the pieces it owns of shared buckets (bounded here by
        # all it steps); a plan that shards nothing steps its own weights in place.
        piece = master if stepped < params else 0
        cast = wbytes if wbytes < 4 else 0
        start, end = group.layers
        buffers = sum(lay.buffer_bytes for lay in self.spec.layers[start:end])
        # Adam's two moments take the master dtype (fp32; fp64 in float64 exactness runs)
        return params * (2 * master + cast) + stepped * (piece + 2 * master) + buffers

    def gradient_bytes(self, group: GroupLike, layers: tuple[int, int] | None = None) -> float:
        """Gradients one device holds of the group's layers (or of `layers`): one per
        parameter, in the master dtype (state_bytes counts them with the weights)."""
        start, end = group.layers if layers is None else layers
        master = max(DTYPE_BYTES[group.dtype], 4)
        return self.spec.device_params(start, end, len(group.devices)) * master

    def activation_bytes_peak(self, group: GroupLike, micro_batch_size: int,
                              in_flight: int, pieces: int = 1) -> float:
        """Activations of `in_flight` micro-batches, plus one backward's working set, plus the
        received input and the sent output of each micro-batch in flight; with the sequence
        in `pieces`, what the pieces' keys and values add."""
        start, end = group.layers
        if not self.spec.layers[start:end]:
            return 0.0
        kept, working = self._kept_elems_per_token(group)
        kept_sum = sum(kept) + self.boundary_elems_per_token(start, end)
        kept_sum += sum(lay.pieces_elems_per_token(pieces, len(group.devices), group.recompute)
                        for lay in self.spec.layers[start:end])
        tokens = micro_batch_size * self.spec.seq_len
        return (in_flight * kept_sum + working) * tokens * DTYPE_BYTES[group.dtype]

    def one_backward_bytes_peak(self, group: GroupLike, micro_batch_size: int) -> float:
        """Activations and gradients together of a group that runs one micro-batch a step.
        Backward goes from the last layer to the first, freeing each layer's activations as
        it builds that layer's gradients: when it is in layer i the device holds the
        activations of layers up to i and the gradients of layers from i (layer i counted in
        both), plus backward's working set and the tensors crossing to the neighbours. The
        largest over i; at the last layer, the whole forward's activations."""
        start, end = group.layers
        if not self.spec.layers[start:end]:
            return 0.0
        kept, working = self._kept_elems_per_token(group)
        act_bytes = micro_batch_size * self.spec.seq_len * DTYPE_BYTES[group.dtype]
        kept_bytes = np.cumsum(kept) * act_bytes  # layers start..i
        grads = [self.gradient_bytes(group, (i, end)) for i in range(start, end)]  # i..end
        held = max(k + g for k, g in zip(kept_bytes, grads, strict=True))
        return float(held) + (working + self.boundary_elems_per_token(start, end)) * act_bytes

    def _kept_elems_per_token(self, group: GroupLike) -> tuple[list[float], float]:
        """Per layer, the elements per token one device keeps of a micro-batch for backward;
        and backward's working set (with recomputation: one layer's rebuilt activations
        too), the largest of the layers'."""
        start, end = group.layers
        tp = len(group.devices)
        layers = self.spec.layers[start:end]
        sp = self.spec.sequence_parallel(tp)
        regather = memory_mode(group) == REGATHER
        full = [lay.kept_elems_per_token(tp, sp, regather) for lay in layers]
        working = max(lay.backward_peak_elems_per_token for lay in layers)
        if group.recompute:
            # one layer's full activations are rebuilt at a time during backward
            kept = [lay.recompute_kept_elems_per_token(tp, sp) for lay in layers]
            return kept, max(full) + working
        return full, working

    def boundary_elems_per_token(self, start: int, end: int) -> float:
        """Per micro-batch in flight: the received input kept for backward and the input
        gradient's send buffer; the output's send buffer."""
        before = 2 * self.spec.layers[start - 1].output_elems_per_token if start > 0 else 0.0
        after = self.spec.layers[end - 1].output_elems_per_token if end < self.spec.n_layers \
            else 0.0
        return before + after


# Not followed tensor by tensor: autograd's and the optimizer's small tensors (step counts,
# scalars), the loss, the rounding of sizes. Measured on the CPU kind, the formulas above come
# within 3 % of the peak (tests/runtime/test_memory.py): this margin keeps them above it.
UNMODELLED_FRACTION = 0.02
UNMODELLED_BYTES = 256 * 2**10
# cuBLAS/cuDNN-like workspaces an accelerator's libraries allocate through torch's caching
# allocator (counted by max_memory_allocated): an assumption, not yet measured on a GPU.
LIBRARY_WORKSPACE_BYTES = 64 * 2**20

# A sync bucket never holds more than this many parameters (plan.sync.BUCKET_PARAMS).
BUCKET_PARAMS = 8 * 2**20


def sync_bound_bytes(device_params, dtype: str, sharded: bool):  # noqa: ANN001 - or arrays
    """Gradient-sync buffers without the plan's layout: the largest bucket flattened (fp32
    gradients), and the all-gather of its shards among two members (padded piece and one
    output per member); a sharded optimizer also flattens the parameters."""
    bucket = np.minimum(device_params, BUCKET_PARAMS) * max(DTYPE_BYTES[dtype], 4)
    return bucket * (3.5 if sharded else 2.5)

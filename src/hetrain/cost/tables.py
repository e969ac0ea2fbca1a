"""Vectorised cost tables: a stage's time and memory for every layer range [start, end) at once.

The planner's partitioning reads these instead of calling CostModel per range. Each entry
follows the same formula as CostModel.layers_compute_s / stage_memory_bytes (tests compare
them), so a plan chosen from the tables gets the same figures from the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetrain.cost.model import (
    DTYPE_BYTES,
    PLAIN,
    RECOMPUTE,
    REGATHER,
    UNMODELLED_FRACTION,
    CostModel,
    sync_bound_bytes,
    tp_comm_passes,
)
from hetrain.errors import CostError


def range_sums(values: np.ndarray) -> np.ndarray:
    """[a, b] -> sum(values[a:b]) for a < b (summed left to right, as Python's sum does);
    0 elsewhere. Shape (n + 1, n + 1)."""
    n = len(values)
    out = np.zeros((n + 1, n + 1))
    for a in range(n):
        out[a, a + 1:] = np.cumsum(values[a:])
    return out


def range_maxima(values: np.ndarray) -> np.ndarray:
    """[a, b] -> max(values[a:b]) for a < b; 0 elsewhere."""
    n = len(values)
    out = np.zeros((n + 1, n + 1))
    for a in range(n):
        out[a, a + 1:] = np.maximum.accumulate(values[a:])
    return out


def valid_ranges(n_layers: int) -> np.ndarray:
    """Boolean mask of non-empty ranges [a, b), a < b."""
    idx = np.arange(n_layers + 1)
    return idx[:, None] < idx[None, :]


@dataclass(frozen=True)
class StageTables:
    """Per-device figures of a stage of one kind and tensor-parallel degree, for every range.

    time_s[mode][a, b]: forward + backward of one micro-batch, mode PLAIN, RECOMPUTE or
    REGATHER (cost.model; without sequence parallelism REGATHER is PLAIN).
    memory: max(fixed_bytes[mode][a, b] + in_flight * per_in_flight_bytes[mode][a, b],
    floor_bytes[a, b]) -- the activation phase, or the states and gradient-sync buffers.
    """

    kind: str
    tp: int
    dtype: str
    micro_batch_size: int
    forward_s: np.ndarray
    time_s: tuple[np.ndarray, np.ndarray, np.ndarray]
    fixed_bytes: tuple[np.ndarray, np.ndarray, np.ndarray]
    per_in_flight_bytes: tuple[np.ndarray, np.ndarray, np.ndarray]
    floor_bytes: np.ndarray
    capacity_bytes: float
    sequence_parallel: bool = False  # else the REGATHER variant is the PLAIN one


class TableCache:
    """Builds StageTables on demand and keeps them: the layer sums are shared by all kinds."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        spec = cost.spec
        self.n_layers = spec.n_layers
        layer = spec.layers
        self._flops = range_sums(np.array([x.forward_flops_per_token for x in layer]))
        self._params = range_sums(np.array([float(x.params) for x in layer]))
        self._tp_allreduces = range_sums(np.array([float(x.tp_allreduces) for x in layer]))
        self._rep_params = range_sums(np.array([float(x.tp_replicated_params) for x in layer]))
        self._buffers = range_sums(np.array([float(x.buffer_bytes) for x in layer]))
        self._acts_layer = np.array([x.activation_elems_per_token for x in layer])
        self._acts = range_sums(self._acts_layer)
        self._bwd_peak = range_maxima(np.array([x.backward_peak_elems_per_token
                                                for x in layer]))
        # CostModel.boundary_elems_per_token for every range
        n = self.n_layers
        out = np.array([x.output_elems_per_token for x in layer])
        before = np.array([2 * out[a - 1] if a > 0 else 0.0 for a in range(n + 1)])
        after = np.array([out[b - 1] if 0 < b < n else 0.0 for b in range(n + 1)])
        self._boundary = before[:, None] + after[None, :]
        self.valid = valid_ranges(self.n_layers)
        self._cache: dict[tuple[str, int, str, int, int], StageTables] = {}

    def params(self) -> np.ndarray:
        return self._params

    def get(self, kind: str, tp: int, dtype: str, micro_batch_size: int,
            optimizer_shards: int = 1) -> StageTables:
        """`optimizer_shards`: a sharded optimizer (ZeRO-1) splits the master weights and Adam
        moments over at least this many holders of each layer."""
        key = (kind, tp, dtype, micro_batch_size, optimizer_shards)
        if key not in self._cache:
            self._cache[key] = self._build(*key)
        return self._cache[key]

    def _build(self, kind_name: str, tp: int, dtype: str, mbs: int,
               optimizer_shards: int) -> StageTables:
        cost, spec = self.cost, self.cost.spec
        kind = cost.cluster.kinds[kind_name]
        tokens = float(mbs * spec.seq_len)
        fwd, bwd = self._compute(kind_name, tp, dtype, tokens)
        comm = self._tp_comm(kind_name, tp, dtype, tokens)
        if cost.profile is not None and cost.profile.has(kind_name) and \
                cost.profile.measured_tp(kind_name, tp):
            comm = 0.0  # as CostModel.layers_compute_s: measured TP includes its all-reduces
        sp = spec.sequence_parallel(tp)
        back, back_rc, back_rg = (tp_comm_passes("backward", sp, mode) * comm
                                  for mode in (PLAIN, RECOMPUTE, REGATHER))
        with np.errstate(invalid="ignore"):
            plain = np.where(self.valid, (fwd + comm) + (bwd + back), np.inf)
            recompute = np.where(self.valid, (fwd + comm) + ((bwd + fwd) + back_rc), np.inf)
            regather = np.where(self.valid, (fwd + comm) + (bwd + back_rg), np.inf) if sp \
                else plain
        # as CostModel.stage_memory_bytes with its default single_backward=False: the tables
        # are built per micro-batch size and shared by routes of any count, so a group that
        # will run one micro-batch a step is priced on the safe side here (its gradients and
        # activations summed); plan.validate.plan_memory_fn prices the chosen plan exactly.
        wbytes = DTYPE_BYTES[dtype]
        params = self._rep_params + (self._params - self._rep_params) / tp
        master = max(wbytes, 4)
        piece = master if optimizer_shards > 1 else 0
        cast = wbytes if wbytes < 4 else 0
        states = params * (2 * master + cast) + params / optimizer_shards * (piece + 2 * master) \
            + self._buffers
        scale = tokens * wbytes
        kept, kept_rc, kept_rg = self._kept(tp, sp)
        acts = range_sums(kept) + self._boundary
        acts_rg = range_sums(kept_rg) + self._boundary if sp else acts
        acts_peak = range_maxima(kept)
        fixed_plain = states + self._bwd_peak * scale
        fixed_rc = fixed_plain + acts_peak * scale
        floor = states + sync_bound_bytes(params, dtype, optimizer_shards > 1)
        grow, extra = 1 + UNMODELLED_FRACTION, cost.fixed_overhead_bytes(kind_name)
        fixed = fixed_plain * grow + extra
        return StageTables(
            kind=kind_name, tp=tp, dtype=dtype, micro_batch_size=mbs,
            forward_s=np.where(self.valid, fwd + comm, np.inf),
            time_s=(plain, recompute, regather),
            fixed_bytes=(fixed, fixed_rc * grow + extra, fixed),  # regathering: as plain
            per_in_flight_bytes=(acts * scale * grow,
                                 (range_sums(kept_rc) + self._boundary) * scale * grow,
                                 acts_rg * scale * grow),
            floor_bytes=floor * grow + extra,
            capacity_bytes=kind.memory_bytes, sequence_parallel=sp,
        )

    def _kept(self, tp: int, sp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer, elements per token one device keeps: plain, recomputing, regathering
        (as CostModel.activation_bytes_peak); `sp`: under sequence parallelism."""
        spec = self.cost.spec
        return (np.array([x.kept_elems_per_token(tp, sp) for x in spec.layers]),
                np.array([x.recompute_kept_elems_per_token(tp, sp) for x in spec.layers]),
                np.array([x.kept_elems_per_token(tp, sp, True) for x in spec.layers]))

    def _compute(self, kind_name: str, tp: int, dtype: str,
                 tokens: float) -> tuple[np.ndarray, np.ndarray]:
        cost = self.cost
        profile = cost.profile
        if profile is not None and profile.has(kind_name):
            return tuple(range_sums(profile.layer_seconds_per_token(kind_name, op, tp, tokens))
                         * tokens for op in ("forward", "backward"))
        kind = cost.cluster.kinds[kind_name]
        if not kind.supports(dtype) and not (dtype == "fp32" and "tf32" in kind.flops):
            raise CostError(f"{kind_name} does not compute in {dtype}")
        rate = kind.peak_flops(dtype) * kind.efficiency * tp
        fwd_flops = tokens * self._flops
        weight_bytes = self._params * DTYPE_BYTES[dtype] / tp
        floor = weight_bytes / (kind.memory_bandwidth_gbps * 1e9)
        return (np.maximum(fwd_flops / rate, floor),
                np.maximum(2 * fwd_flops / rate, 2 * floor))

    def _tp_comm(self, kind_name: str, tp: int, dtype: str, tokens: float) -> np.ndarray | float:
        if tp <= 1:
            return 0.0
        bytes_each = tokens * self.cost.spec.dim * DTYPE_BYTES[dtype]
        bw = self.cost.cluster.kinds[kind_name].intra_node_gbps * 1e9
        return self._tp_allreduces * 2 * (tp - 1) / tp * bytes_each / bw

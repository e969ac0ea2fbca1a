"""MeasuredCost: a cost model whose every figure was measured on a run, not derived from specs.

Compute is looked up per stage shape (kind, layer range in whole or half layers, tensor-
parallel degree, op) and micro-batch size (a trimmed mean of the measured durations: a chain
of actions adds up their jitter, but not a rare stall); transfers, all-reduces and the
optimizer follow latency + bytes / bandwidth fits through trimmed means. The simulator run on
it predicts what the measured machine would do, which is how its scheduling and
communication modelling are checked (`hetrain bench sim`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import SPLIT_BACKWARD, CostModel, GroupLike, Op
from hetrain.errors import CostError
from hetrain.model.spec import ModelSpec

# kind, layer range, tp, op, and whether the range counts half layers (Plan.half_layers: the
# same numbers name other layers)
StageKey = tuple[str, tuple[int, int], int, str, bool]


def stage_key(group: GroupLike, op: str, half_layers: bool = False) -> StageKey:
    return group.kind, tuple(group.layers), len(group.devices), op, half_layers


@dataclass(frozen=True)
class LinearFit:
    """y = fixed + slope * x, both clipped at zero: latency + bytes / bandwidth."""

    fixed: float
    slope: float = 0.0
    samples: int = 0

    def __call__(self, x: float) -> float:
        return self.fixed + self.slope * x


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Least squares with non-negative coefficients; a constant (the median) when x barely
    varies or the slope comes out negative."""
    if not ys:
        raise CostError("nothing measured to fit")
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if n >= 2 and var_x > 1e-12 * max(mean_x**2, 1.0):
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x
        if slope > 0:
            fixed = mean_y - slope * mean_x
            if fixed >= 0:
                return LinearFit(fixed, slope, n)
            # Through the origin: bandwidth only.
            return LinearFit(0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) /
                             sum(x * x for x in xs), n)
    return LinearFit(max(0.0, statistics.median(ys)), 0.0, n)


def trimmed_mean(values: Sequence[float], cut: float = 0.1) -> float:
    """Mean without the `cut` share of lowest and of highest values."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k:len(ordered) - k])


def fit_trimmed(pairs: Sequence[tuple[float, float]]) -> LinearFit:
    """fit_linear through the trimmed mean y of each distinct x: the typical time, jitter
    included (it adds up along a step), rare stalls not."""
    by_x: dict[float, list[float]] = {}
    for x, y in pairs:
        by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    fit = fit_linear(xs, [trimmed_mean(by_x[x]) for x in xs])
    return LinearFit(fit.fixed, fit.slope, len(pairs))


@dataclass
class MeasuredFigures:
    """What a run measured, before fitting: plain lists of seconds (and bytes)."""

    # stage key -> tokens of one action (samples x tokens each: a sequence or a piece of it)
    # -> durations of that action
    compute_s: dict[StageKey, dict[int, list[float]]] = field(default_factory=dict)
    # (bytes, seconds) from the send to the receiver's start, where the receive was posted
    # first; and the receiver's wait where it was posted after the send (handshake + transfer)
    p2p: list[tuple[float, float]] = field(default_factory=list)
    late_recv: list[tuple[float, float]] = field(default_factory=list)
    allreduce: list[tuple[float, float, float]] = field(default_factory=list)  # (phases, bytes, s)
    # kind -> (parameters per device, seconds)
    optimizer: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def merge(self, other: MeasuredFigures) -> None:
        for key, by_tokens in other.compute_s.items():
            mine = self.compute_s.setdefault(key, {})
            for tokens, durs in by_tokens.items():
                mine.setdefault(tokens, []).extend(durs)
        self.p2p.extend(other.p2p)
        self.late_recv.extend(other.late_recv)
        self.allreduce.extend(other.allreduce)
        for kind, pairs in other.optimizer.items():
            self.optimizer.setdefault(kind, []).extend(pairs)


def allreduce_phases(kinds: Sequence[str]) -> int:
    """Collectives one after another in a gradient bucket's sum over ranks of `kinds`: one
    native all-reduce inside a single kind; else reduce to leaders (when some kind has two or
    more ranks), all-reduce among leaders, broadcast back."""
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    if len(kinds) < 2:
        return 0
    if len(counts) == 1:
        return 1
    return 3 if max(counts.values()) > 1 else 1


class MeasuredCost(CostModel):
    """CostModel answering from measured figures (a trimmed mean of each stage action's
    durations; fitted lines for transfers, all-reduce phases and the optimizer)."""

    def __init__(self, cluster: Cluster, spec: ModelSpec, figures: MeasuredFigures):
        super().__init__(cluster, spec)
        self.figures = figures
        self.stage_s = {key: {tokens: trimmed_mean(durs) for tokens, durs in by_tokens.items()}
                        for key, by_tokens in figures.compute_s.items()}
        # Receives that all came late time handshake and transfer together: all transfer.
        self.p2p_fit = fit_trimmed(figures.p2p or figures.late_recv) \
            if figures.p2p or figures.late_recv else None
        self.handshake_s = 0.0
        if figures.p2p and figures.late_recv:
            self.handshake_s = max(0.0, trimmed_mean(
                [s - self.p2p_fit(b) for b, s in figures.late_recv]))
        self.phase_fit = (fit_trimmed([(b, s / p) for p, b, s in figures.allreduce])
                          if figures.allreduce else None)
        self.optimizer_fit = {kind: fit_trimmed(pairs)
                              for kind, pairs in figures.optimizer.items()}

    def stage_compute_s(self, group: GroupLike, op: Op, samples: int, seq_len: int) -> float:
        by_tokens = self.stage_s.get(stage_key(group, op, self.spec.half_layers))
        if not by_tokens and op in SPLIT_BACKWARD and op != "backward":
            # split backward not measured on its own: its share of the whole backward
            return SPLIT_BACKWARD[op] * self.stage_compute_s(group, "backward", samples, seq_len)
        if not by_tokens:
            raise CostError(f"no measured {op} for {group.kind} layers {tuple(group.layers)} "
                            f"on {len(group.devices)} device(s)")
        tokens = samples * seq_len
        if tokens in by_tokens:
            return by_tokens[tokens]
        nearest = min(by_tokens, key=lambda s: (abs(s - tokens), s))
        return by_tokens[nearest] * tokens / nearest

    def p2p_s(self, src_device: str, dst_device: str, nbytes: float) -> float:
        if src_device == dst_device:
            return 0.0
        if self.p2p_fit is None:
            raise CostError("no measured transfers to time a P2P send")
        return self.p2p_fit(nbytes)

    def p2p_handshake_s(self, src_device: str, dst_device: str) -> float:
        return 0.0 if src_device == dst_device else self.handshake_s

    def sync_s(self, devices: list[str], nbytes: float) -> float:
        """A gradient bucket's sum, timed as the measured phases of the run's collectives."""
        phases = allreduce_phases([self.cluster.device_by_id[d].kind for d in devices])
        if phases == 0 or nbytes <= 0:
            return 0.0
        if self.phase_fit is None:
            raise CostError("no measured all-reduce to time a gradient sync")
        return phases * self.phase_fit(nbytes)

    def optimizer_s(self, kind: str, params: float) -> float:
        fit = self.optimizer_fit.get(kind)
        if fit is None:
            if not self.optimizer_fit:
                raise CostError("no measured optimizer step")
            # Not measured on this kind: the mean over the kinds that were.
            return statistics.fmean(f(params) for f in self.optimizer_fit.values())
        return fit(params)

    def summary(self) -> dict:
        """The fitted figures, for the bench's JSON."""
        out: dict = {"p2p": _fit_dict(self.p2p_fit, "latency_s", "s_per_byte"),
                     "p2p_handshake_s": self.handshake_s,
                     "allreduce_phase": _fit_dict(self.phase_fit, "latency_s", "s_per_byte"),
                     "optimizer": {k: _fit_dict(f, "fixed_s", "s_per_param")
                                   for k, f in self.optimizer_fit.items()}}
        out["stage_compute_s"] = {
            f"{kind} {layers[0]}-{layers[1]}{' half layers' if half else ''} tp{tp} {op}":
            {str(s): v for s, v in sizes.items()}
            for (kind, layers, tp, op, half), sizes in sorted(self.stage_s.items())}
        return out


def _fit_dict(fit: LinearFit | None, fixed: str, slope: str) -> dict | None:
    if fit is None:
        return None
    return {fixed: fit.fixed, slope: fit.slope, "samples": fit.samples}

"""Measured compute costs: seconds per token of each layer's forward and backward, per kind,
per tensor-parallel degree and micro-batch size.

`measure_profile` times every layer of the reference decoder on the torch devices present
(`hetrain profile`); the CostModel then uses these figures for those kinds instead of the
catalog's roofline: the entry measured at the stage's TP degree (else the nearest degree,
its work divided over the group), interpolated per token between the measured micro-batch
sizes. Files of format 1 (one tp-1 figure per kind) still load, as one entry.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetrain.errors import CostError

Op = Literal["forward", "backward"]
FORMAT = "hetrain-profile/2"
FORMAT_V1 = "hetrain-profile/1"


class ProfileEntry(BaseModel):
    """One measured shape: per layer, seconds per token on ONE device of a `tp`-way group
    (its share of the TP communication included) at `micro_batch_size` samples per pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int = Field(default=1, ge=1)
    micro_batch_size: int = Field(default=1, ge=1)
    forward_s_per_token: list[float]
    backward_s_per_token: list[float]

    @model_validator(mode="after")
    def _check(self) -> ProfileEntry:
        if len(self.forward_s_per_token) != len(self.backward_s_per_token):
            raise ValueError("forward and backward lists differ in length")
        if any(x < 0 for x in self.forward_s_per_token + self.backward_s_per_token):
            raise ValueError("seconds per token must be >= 0")
        return self

    def seconds_per_token(self, op: Op) -> np.ndarray:
        return np.array(self.forward_s_per_token if op == "forward"
                        else self.backward_s_per_token)


class KindProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(description="torch device the figures were measured on")
    dtype: str
    entries: list[ProfileEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> KindProfile:
        shapes = [(e.tp, e.micro_batch_size) for e in self.entries]
        if len(set(shapes)) != len(shapes):
            raise ValueError("two entries for one (tp, micro_batch_size)")
        if len({len(e.forward_s_per_token) for e in self.entries}) != 1:
            raise ValueError("entries differ in their number of layers")
        return self

    @property
    def n_layers(self) -> int:
        return len(self.entries[0].forward_s_per_token)

    def entry(self, tp: int, micro_batch_size: int) -> ProfileEntry | None:
        return next((e for e in self.entries
                     if (e.tp, e.micro_batch_size) == (tp, micro_batch_size)), None)


def nearest_tp(measured: list[int], tp: int) -> int:
    """The measured TP degree closest to `tp` by ratio (ties: the larger degree)."""
    return min(measured, key=lambda t: (abs(math.log(t / tp)), -t))


def interpolate(points: list[tuple[float, np.ndarray]], x: float) -> np.ndarray:
    """Piecewise-linear in x through sorted (x, values) points, constant beyond the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            w = (x - x0) / (x1 - x0)
            return (1 - w) * y0 + w * y1
    return points[-1][1]


def _from_v1(raw: dict) -> dict:
    """A format-1 file: one seconds-per-token list per kind, measured at tp 1 and the file's
    micro-batch size."""
    mbs = raw.get("micro_batch_size", 1)
    kinds = {}
    for kind, kp in raw.get("kinds", {}).items():
        if not isinstance(kp, dict) or "entries" in kp:
            kinds[kind] = kp
            continue
        kp = dict(kp)
        entry = {"tp": 1, "micro_batch_size": mbs,
                 "forward_s_per_token": kp.pop("forward_s_per_token", []),
                 "backward_s_per_token": kp.pop("backward_s_per_token", [])}
        kinds[kind] = kp | {"entries": [entry]}
    return {k: v for k, v in raw.items() if k != "micro_batch_size"} | {
        "format": FORMAT, "kinds": kinds}


class Profile(BaseModel):
    """Per kind, per measured (tp, micro-batch size), per layer (embed, blocks, head) seconds
    per token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    model: str
    seq_len: int = Field(gt=0)
    kinds: dict[str, KindProfile]

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("format") == FORMAT_V1:
            return _from_v1(raw)
        return raw

    # --- the interface CostModel reads ---------------------------------------------------------
    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def measured_tp(self, kind: str, tp: int) -> bool:
        """Whether some entry was measured at this TP degree (its TP communication is then in
        the figures; from another degree it is not)."""
        return any(e.tp == tp for e in self.kinds[kind].entries)

    def layer_seconds_per_token(self, kind: str, op: Op, tp: int = 1,
                                tokens: float | None = None) -> np.ndarray:
        """Per layer, seconds per token on one device of a `tp`-way group running passes of
        `tokens` tokens: the nearest measured degree (scaled by its ratio to `tp`: the work
        divides over the group), interpolated between its measured micro-batch sizes."""
        entries = self.kinds[kind].entries
        near = nearest_tp(sorted({e.tp for e in entries}), tp)
        points = sorted((e.micro_batch_size * self.seq_len, e.seconds_per_token(op))
                        for e in entries if e.tp == near)
        at = interpolate(points, points[0][0] if tokens is None else tokens)
        return at * (near / tp) if near != tp else at

    def forward_s(self, kind: str, start: int, end: int, tokens: float, tp: int = 1) -> float:
        per = self.layer_seconds_per_token(kind, "forward", tp, tokens)
        return tokens * sum(per[start:end])

    def backward_s(self, kind: str, start: int, end: int, tokens: float, tp: int = 1) -> float:
        per = self.layer_seconds_per_token(kind, "backward", tp, tokens)
        return tokens * sum(per[start:end])

    def in_halves(self, spec: Any) -> Profile:
        """The profile over a model's half layers (model.spec.ModelSpec with half_layers): each
        block's seconds split between its attention half and its MLP half as their forward
        FLOPs are (the measured figures time whole blocks)."""
        flops = [lay.forward_flops_per_token for lay in spec.layers[1:-1]]
        shares = [a / max(a + b, 1e-30) for a, b in zip(flops[0::2], flops[1::2], strict=True)]

        def split(per_layer: list[float]) -> list[float]:
            blocks = per_layer[1:-1]
            if len(blocks) != len(shares):
                raise CostError(f"profile of {self.model!r} has {len(per_layer)} layers; the "
                                f"model has {len(shares) + 2}")
            halves = [x for s, share in zip(blocks, shares, strict=True)
                      for x in (s * share, s * (1 - share))]
            return [per_layer[0], *halves, per_layer[-1]]

        kinds = {k: prof.model_copy(update={"entries": [
            e.model_copy(update={"forward_s_per_token": split(e.forward_s_per_token),
                                 "backward_s_per_token": split(e.backward_s_per_token)})
            for e in prof.entries]}) for k, prof in self.kinds.items()}
        return self.model_copy(update={"kinds": kinds})

    # --- files ---------------------------------------------------------------------------------
    def check_layers(self, n_layers: int, model: str) -> None:
        for kind, prof in self.kinds.items():
            if prof.n_layers != n_layers:
                raise CostError(f"profile of {self.model!r} has {prof.n_layers} "
                                f"layers for {kind}, but model {model!r} has {n_layers}; "
                                f"run 'hetrain profile --model {model}'")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except OSError as err:
            raise CostError(f"{path}: cannot read the profile ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise CostError(f"{path}: not valid JSON: {err}") from None
        if isinstance(raw, dict) and raw.get("format") not in (FORMAT, FORMAT_V1):
            raise CostError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}; re-run "
                            "'hetrain profile'")
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            from hetrain.cluster.loading import validation_message

            raise CostError(validation_message(err, str(path))) from None


# --- measuring ---------------------------------------------------------------------------------
TORCH_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _synchronize(device: str) -> Callable[[], None]:
    """Waits for the device's queued work, whatever its vendor (cluster/devices.py)."""
    from hetrain.cluster.devices import synchronize

    return lambda: synchronize(device)


def time_layer_s(layer, x, device: str, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of one forward and of one backward of `layer` on input `x`."""
    import torch

    sync = _synchronize(device)
    fwd_times, bwd_times = [], []
    for i in range(warmup + repeats):
        inp = x.detach().requires_grad_(x.is_floating_point())
        sync()
        t0 = time.perf_counter()
        out = layer(inp)
        sync()
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        sync()
        t2 = time.perf_counter()
        layer.zero_grad(set_to_none=True)
        if i >= warmup:
            fwd_times.append(t1 - t0)
            bwd_times.append(t2 - t1)
    return statistics.median(fwd_times), statistics.median(bwd_times)


def measure_layers(layers, x, device: str, repeats: int) -> tuple[list[float], list[float]]:
    """Per layer, median forward and backward seconds per token of passes over input `x`."""
    import torch

    tokens = x.shape[0] * x.shape[1]
    fwd, bwd = [], []
    for layer in layers:
        f_s, b_s = time_layer_s(layer, x, device, repeats)
        fwd.append(f_s / tokens)
        bwd.append(b_s / tokens)
        with torch.no_grad():
            x = layer(x)
    return fwd, bwd


def sample_ids(cfg, micro_batch_size: int, seq_len: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (micro_batch_size, seq_len), generator=gen)


def measure_kind(cfg, device: str, dtype: str, seq_len: int, micro_batch_sizes: list[int],
                 repeats: int) -> KindProfile:
    """Time each layer of the reference decoder on one torch device (tp 1), once per
    micro-batch size."""
    import torch

    from hetrain.model.decoder import build_decoder

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    model = build_decoder(cfg).to(device=device, dtype=torch_dtype)
    entries = []
    for mbs in micro_batch_sizes:
        x = sample_ids(cfg, mbs, seq_len).to(device)
        fwd, bwd = measure_layers(model.layers(), x, device, repeats)
        entries.append(ProfileEntry(tp=1, micro_batch_size=mbs, forward_s_per_token=fwd,
                                    backward_s_per_token=bwd))
    return KindProfile(device=device, dtype=dtype, entries=entries)


def measure_profile(cfg, present: dict[str, list[str]], kinds_catalog: dict, *,
                    seq_len: int, micro_batch_sizes: list[int] | None = None,
                    repeats: int = 3, dtype: str | None = None) -> Profile:
    """Profile every kind in `present` (kind -> torch devices) on its first device, at tp 1.
    The dtype is the kind's best (bf16 where it has it) unless given."""
    if not present:
        raise CostError("no devices to profile")
    out = {}
    for kind, devices in present.items():
        kind_dtype = dtype or kinds_catalog[kind].best_dtype()
        out[kind] = measure_kind(cfg, devices[0], kind_dtype, seq_len,
                                 micro_batch_sizes or [1], repeats)
    return Profile(model=cfg.name, seq_len=seq_len, kinds=out)


def with_entries(profile: Profile, kind: str, entries: list[ProfileEntry]) -> Profile:
    """`profile` with more measured entries for `kind` (e.g. tensor-parallel ones)."""
    raw = profile.model_dump()
    raw["kinds"][kind]["entries"] += [e.model_dump() for e in entries]
    return Profile.model_validate(raw)

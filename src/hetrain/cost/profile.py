"""Measured compute costs: seconds per token of each layer's forward and backward, per kind.

`measure_profile` times every layer of the reference decoder on the torch devices present;
the CostModel then uses these figures for those kinds instead of the catalog's roofline.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetrain.errors import CostError

Op = Literal["forward", "backward"]
FORMAT = "hetrain-profile/1"


class KindProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(description="torch device the figures were measured on")
    dtype: str
    forward_s_per_token: list[float]
    backward_s_per_token: list[float]

    @model_validator(mode="after")
    def _check(self) -> KindProfile:
        if len(self.forward_s_per_token) != len(self.backward_s_per_token):
            raise ValueError("forward and backward lists differ in length")
        if any(x < 0 for x in self.forward_s_per_token + self.backward_s_per_token):
            raise ValueError("seconds per token must be >= 0")
        return self


class Profile(BaseModel):
    """Per kind, per layer (embed, blocks, head) seconds per token; linear in tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    model: str
    seq_len: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    kinds: dict[str, KindProfile]

    # --- the interface CostModel reads ---------------------------------------------------------
    def has(self, kind: str) -> bool:
        return kind in self.kinds

    def layer_seconds_per_token(self, kind: str, op: Op) -> np.ndarray:
        prof = self.kinds[kind]
        return np.array(prof.forward_s_per_token if op == "forward" else prof.backward_s_per_token)

    def forward_s(self, kind: str, start: int, end: int, tokens: float) -> float:
        return tokens * sum(self.kinds[kind].forward_s_per_token[start:end])

    def backward_s(self, kind: str, start: int, end: int, tokens: float) -> float:
        return tokens * sum(self.kinds[kind].backward_s_per_token[start:end])

    # --- files ---------------------------------------------------------------------------------
    def check_layers(self, n_layers: int, model: str) -> None:
        for kind, prof in self.kinds.items():
            if len(prof.forward_s_per_token) != n_layers:
                raise CostError(f"profile of {self.model!r} has {len(prof.forward_s_per_token)} "
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
        try:
            prof = cls.model_validate(raw)
        except ValidationError as err:
            from hetrain.cluster.loading import validation_message

            raise CostError(validation_message(err, str(path))) from None
        if prof.format != FORMAT:
            raise CostError(f"{path}: format {prof.format!r} is not {FORMAT!r}; re-run "
                            "'hetrain profile'")
        return prof


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


def measure_kind(cfg, device: str, dtype: str, seq_len: int, micro_batch_size: int,
                 repeats: int) -> KindProfile:
    """Time each layer of the reference decoder on one torch device."""
    import torch

    from hetrain.model.decoder import build_decoder

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    model = build_decoder(cfg).to(device=device, dtype=torch_dtype)
    tokens = micro_batch_size * seq_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch_size, seq_len), generator=gen)
    x = ids.to(device)
    fwd, bwd = [], []
    for layer in model.layers():
        f_s, b_s = time_layer_s(layer, x, device, repeats)
        fwd.append(f_s / tokens)
        bwd.append(b_s / tokens)
        with torch.no_grad():
            x = layer(x)
    return KindProfile(device=device, dtype=dtype, forward_s_per_token=fwd,
                       backward_s_per_token=bwd)


def measure_profile(cfg, present: dict[str, list[str]], kinds_catalog: dict, *,
                    seq_len: int, micro_batch_size: int = 1, repeats: int = 3,
                    dtype: str | None = None) -> Profile:
    """Profile every kind in `present` (kind -> torch devices) on its first device. The dtype is
    the kind's best (bf16 where it has it) unless given."""
    if not present:
        raise CostError("no devices to profile")
    out = {}
    for kind, devices in present.items():
        kind_dtype = dtype or kinds_catalog[kind].best_dtype()
        out[kind] = measure_kind(cfg, devices[0], kind_dtype, seq_len, micro_batch_size, repeats)
    return Profile(model=cfg.name, seq_len=seq_len, micro_batch_size=micro_batch_size, kinds=out)

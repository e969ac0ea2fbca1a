"""Which kinds are physically present on this machine; all others run emulated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetrain.cluster.kinds import CATALOG


@dataclass(frozen=True)
class LocalDevice:
    torch_device: str  # "cuda:0", "cpu"
    name: str  # what the driver calls it
    kind: str | None  # catalog kind it matches, if any
    memory_gib: float


def _match_kind(driver_name: str) -> str | None:
    flat = driver_name.lower().replace(" ", "").replace("-", "")
    for kind in sorted(CATALOG, key=len, reverse=True):
        key = kind.lower().replace("-", "")
        if kind == "cpu":
            continue
        if key in flat or key.replace("gb", "") in flat:
            return kind
    return None


def local_devices() -> list[LocalDevice]:
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            kind = _match_kind(props.name)
            if kind == "A100-40GB" and props.total_memory > 50 * 1024**3:
                kind = "A100-80GB"
            found.append(LocalDevice(f"cuda:{i}", props.name, kind, props.total_memory / 1024**3))
    found.append(LocalDevice("cpu", "host CPU", "cpu", 0.0))
    return found


def present_kinds() -> dict[str, list[str]]:
    """Kind -> torch devices present here (cpu is always present)."""
    out: dict[str, list[str]] = {}
    for dev in local_devices():
        if dev.kind:
            out.setdefault(dev.kind, []).append(dev.torch_device)
    return out

"""Which devices are physically here, of every vendor, and which kinds run real on them.

Each device type of the device layer (cluster/devices.py) is probed through PyTorch's
device-generic API once its plugin imports; a device matches the kind of its type whose name
its driver name contains. The host CPU is always a usable real device (device type "cpu").
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import torch

from hetrain.cluster import devices as dl
from hetrain.cluster.kinds import CATALOG, GIB, DeviceKind


@dataclass(frozen=True)
class LocalDevice:
    torch_device: str  # "cuda:0", "npu:3", "cpu"
    device_type: str
    name: str  # what the driver calls it
    kind: str | None  # kind it matches, if any
    vendor: str
    memory_gib: float
    backend: str
    usable: bool  # hetrain can run a kind on it (a known kind, its backend registered)
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _flat(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _tokens(kind_name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", kind_name.lower()) if t]


def match_kind(driver_name: str, device_type: str, kinds: dict[str, DeviceKind] | None = None,
               memory_gib: float = 0.0) -> str | None:
    """The kind of `device_type` every part of whose name the driver name contains ("A100" and
    "80GB" in "NVIDIA A100-SXM4-80GB"); more specific names first, so "H200" wins over "H20".
    A driver name without the memory size picks the kind whose memory is closest."""
    kinds = CATALOG if kinds is None else kinds
    flat = _flat(driver_name)
    ours = [k for k in kinds if kinds[k].device_type == device_type and device_type != "cpu"]
    ours.sort(key=lambda k: (len(_tokens(k)), len(k)), reverse=True)
    for name in ours:
        if all(t in flat for t in _tokens(name)):
            return name
    sized = [k for k in ours
             if all(t in flat for t in _tokens(k) if not re.fullmatch(r"\d+gb", t))]
    if not sized:
        return None
    return min(sized, key=lambda k: abs(kinds[k].memory_gib - memory_gib))


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cpu_device(kinds: dict[str, DeviceKind]) -> LocalDevice:
    cpu = kinds.get("cpu", CATALOG["cpu"])
    return LocalDevice("cpu", "cpu", f"host CPU ({os.cpu_count() or 1} cores)", "cpu",
                       cpu.vendor, round(_host_memory_gib(), 1), "gloo",
                       usable=dl.backend_available("gloo"))


def device_types(kinds: dict[str, DeviceKind]) -> dict[str, str | None]:
    """Device type -> plugin module, for every type the layer or the kinds know, and the
    accelerator torch reports (a plugin may register one the table does not name)."""
    types = {t: r.plugin for t, r in dl.DEVICE_TYPES.items() if t != "cpu"}
    for kind in kinds.values():
        if kind.device_type != "cpu" and (kind.plugin or kind.device_type not in types):
            types[kind.device_type] = kind.plugin
    accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accel is not None and accel.type not in types:
        types[accel.type] = None
    return types


def local_devices(kinds: dict[str, DeviceKind] | None = None) -> list[LocalDevice]:
    """Every device found here, accelerators first, then the host CPU."""
    kinds = CATALOG if kinds is None else kinds
    found = []
    for device_type, plugin in device_types(kinds).items():
        if dl.plugin_problem(plugin) is not None:
            continue
        for i in range(dl.device_count(device_type)):
            found.append(_local_device(device_type, i, kinds))
    found.append(_cpu_device(kinds))
    return found


def _local_device(device_type: str, index: int, kinds: dict[str, DeviceKind]) -> LocalDevice:
    name = dl.device_name(device_type, index)
    memory = dl.device_memory_bytes(device_type, index)
    kind = match_kind(name, device_type, kinds, memory / GIB)
    if kind is not None:
        backend = kinds[kind].backend or ""
        vendor = kinds[kind].vendor
    else:
        known = dl.DEVICE_TYPES.get(device_type)
        backend, vendor = (known.backend if known else ""), "unknown"
    note = "" if kind else "not in the catalog: declare it under kinds: in the cluster YAML"
    if kind and not dl.backend_available(backend):
        note = f"backend {backend!r} is not registered in torch.distributed"
    return LocalDevice(f"{device_type}:{index}", device_type, name, kind, vendor,
                       round(memory / GIB, 1), backend,
                       usable=kind is not None and dl.backend_available(backend), note=note)


def present_kinds(kinds: dict[str, DeviceKind] | None = None) -> dict[str, list[str]]:
    """Kind -> usable torch devices here, in index order (cpu is always present)."""
    out: dict[str, list[str]] = {}
    for dev in local_devices(kinds):
        if dev.kind and dev.usable:
            out.setdefault(dev.kind, []).append(dev.torch_device)
    return out


def devices_of_type(device_type: str, plugin: str | None) -> list[str]:
    """All torch devices of a type here, whatever their names (for kinds declared real)."""
    if dl.plugin_problem(plugin) is not None:
        return []
    return [f"{device_type}:{i}" for i in range(dl.device_count(device_type))]


def kind_devices(kind: DeviceKind, present: dict[str, list[str]]) -> list[str]:
    """The local devices `kind` may run on: those whose driver name matches it; for a kind
    declared `mode: real`, any device of its type (its owner says they are this kind)."""
    found = present.get(kind.name, [])
    if not found and kind.mode == "real":
        found = devices_of_type(kind.device_type, kind.plugin)
    return found


def real_kind_devices(kinds: dict[str, DeviceKind], need: dict[str, int]) -> dict[str, list[str]]:
    """For each kind of `need` (kind -> devices the job uses) that runs real here, the torch
    devices its processes bind to, one per device, in order. `cpu` is real on any machine (one
    process per device); `mode: auto` kinds are real when enough matching devices are here;
    `mode: real` kinds must be (else one-line ClusterError before any worker starts)."""
    present = present_kinds(kinds)
    out: dict[str, list[str]] = {}
    for name, n in need.items():
        kind = kinds[name]
        if kind.mode == "emulated":
            continue
        if kind.device_type == "cpu":
            out[name] = ["cpu"] * n
            continue
        found = kind_devices(kind, present)
        if kind.mode == "real":
            dl.require_real(kind, n, len(found))
        elif dl.real_problem(kind, n, len(found)) is not None:
            continue
        out[name] = found[:n]
    return out

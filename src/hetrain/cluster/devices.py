"""The device layer: per device type, the vendor's PyTorch plugin and collective backend; which
kinds can run for real here, and binding a process to its device.

Vendors ship their accelerators to PyTorch as a plugin module that registers a device type
(through the PrivateUse1 mechanism) and a `torch.distributed` backend. Everything past the
import goes through PyTorch's device-generic API (`torch.get_device_module`,
`torch.distributed.is_backend_available`), so no code here branches on a vendor.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from hetrain.errors import ClusterError


class DeviceKind(Protocol):
    """What this module reads of a kind (cluster.kinds.DeviceKind, which imports this
    module's DEVICE_TYPES, implements it)."""

    name: str
    device_type: str
    plugin: str | None
    backend: str | None


@dataclass(frozen=True)
class DeviceRuntime:
    """How PyTorch reaches one device type: the plugin to import first (None: built into
    torch) and the `torch.distributed` backend the plugin registers for it."""

    device_type: str
    plugin: str | None
    backend: str


# The names each vendor's plugin registers (device type, backend), as the vendors ship them.
DEVICE_TYPES: dict[str, DeviceRuntime] = {r.device_type: r for r in (
    # NVIDIA CUDA; ROCm builds of torch also use the "cuda" device type, and RCCL registers
    # itself as the "nccl" backend there.
    DeviceRuntime("cuda", None, "nccl"),
    DeviceRuntime("npu", "torch_npu", "hccl"),  # Huawei Ascend (torch_npu, HCCL)
    DeviceRuntime("mlu", "torch_mlu", "cncl"),  # Cambricon (torch_mlu, CNCL)
    DeviceRuntime("musa", "torch_musa", "mccl"),  # Moore Threads (torch_musa, MCCL)
    DeviceRuntime("xpu", None, "xccl"),  # Intel GPUs: built into torch >= 2.8 (XCCL)
    DeviceRuntime("hpu", "habana_frameworks.torch", "hccl"),  # Intel Gaudi (Habana HCCL)
    DeviceRuntime("cpu", None, "gloo"),
)}


def runtime_of(kind: DeviceKind) -> DeviceRuntime:
    """The kind's runtime as its catalog entry or cluster YAML declares it."""
    return DeviceRuntime(kind.device_type, kind.plugin, kind.backend or "")


@functools.cache
def plugin_problem(module: str | None) -> str | None:
    """Why the plugin `module` cannot be imported here; None when it imported (or is None)."""
    if module is None:
        return None
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # its parent package is missing (habana_frameworks)
        spec = None
    if spec is None:
        return "is not installed"
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken plugin is reported, not raised
        return f"failed to import ({type(err).__name__}: {err})"
    return None


def device_module(device_type: str):
    """torch's module for `device_type` (torch.cuda, torch.npu, ...), or None if torch does
    not know the device type (its plugin not imported)."""
    try:
        return torch.get_device_module(device_type)
    except (RuntimeError, AttributeError, ValueError):
        return None


def device_count(device_type: str) -> int:
    """Devices of `device_type` this process can see (0 when the type is unknown here)."""
    if device_type == "cpu":
        return 1
    mod = device_module(device_type)
    try:
        return int(mod.device_count()) if mod is not None and mod.is_available() else 0
    except Exception:  # noqa: BLE001 - a driver that fails to answer has no usable device
        return 0


def backend_available(backend: str | None) -> bool:
    return bool(backend) and dist.is_available() and dist.is_backend_available(backend)


def device_name(device_type: str, index: int) -> str:
    mod = device_module(device_type)
    try:
        return str(mod.get_device_name(index))
    except Exception:  # noqa: BLE001 - not every plugin implements it
        return f"{device_type}:{index}"


def device_memory_bytes(device_type: str, index: int) -> int:
    mod = device_module(device_type)
    try:
        return int(mod.get_device_properties(index).total_memory)
    except Exception:  # noqa: BLE001 - not every plugin implements it
        return 0


def real_problem(kind: DeviceKind, need: int, found: int) -> str | None:
    """Why `kind` cannot run for real on `need` devices here (None: it can), given that
    `found` local devices match it."""
    rt = runtime_of(kind)
    if kind.device_type == "cpu":
        return None
    if rt.plugin is None and rt.device_type not in DEVICE_TYPES:
        return (f"its PyTorch plugin is not known; declare it under kinds: {kind.name}: "
                "{plugin: MODULE, device_type: TYPE, backend: NAME}")
    problem = plugin_problem(rt.plugin)
    if problem is not None:
        return f"its plugin module {rt.plugin} {problem}"
    if device_module(rt.device_type) is None:
        return f"torch has no device type {rt.device_type!r} after importing {rt.plugin}"
    if found < need:
        return f"it needs {need} {rt.device_type} devices and {found} are present"
    if not backend_available(rt.backend):
        return f"torch.distributed has no backend {rt.backend!r} registered"
    return None


def require_real(kind: DeviceKind, need: int, found: int) -> None:
    """Raise, in one line, when a kind that must run real (mode: real) cannot."""
    problem = real_problem(kind, need, found)
    if problem is not None:
        rt = runtime_of(kind)
        raise ClusterError(
            f"kind {kind.name} must run real (mode: real) but {problem}; it needs module "
            f"{rt.plugin or 'torch (built in)'}, device type {rt.device_type!r} and backend "
            f"{rt.backend or '(undeclared)'!r}: install the vendor's PyTorch plugin, or set "
            "mode: auto to emulate it when absent")


def bind_process(kind: DeviceKind, torch_device: str) -> None:
    """Make this worker process use `torch_device` ("npu:1"): import the kind's plugin (a
    spawned process starts without it; torch cannot parse "npu" before), then set the current
    device of that type."""
    problem = plugin_problem(kind.plugin)
    if problem is not None:
        raise ClusterError(f"kind {kind.name}: plugin module {kind.plugin} {problem}")
    device = torch.device(torch_device)
    if device.type == "cpu" or device.index is None:
        return
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None and accelerator.type == device.type:
        torch.accelerator.set_device_index(device.index)
        return
    mod = device_module(device.type)
    if mod is not None and hasattr(mod, "set_device"):
        mod.set_device(device.index)


def synchronize(torch_device: str) -> None:
    """Wait for the device's queued work (for timing); nothing to do on the CPU."""
    device_type = torch.device(torch_device).type
    if device_type == "cpu":
        return
    mod = device_module(device_type)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()

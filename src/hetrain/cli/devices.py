"""`hetrain devices`: the catalog of kinds, the device layer, and the devices found here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import app, user_errors
from hetrain.cli.report import write_json
from hetrain.cluster import devices as dl
from hetrain.cluster.discovery import device_types, kind_devices, local_devices, present_kinds
from hetrain.cluster.kinds import CATALOG, DeviceKind
from hetrain.cluster.topology import Cluster


def device_type_rows(kinds: dict[str, DeviceKind]) -> list[dict[str, Any]]:
    """Per device type: its plugin, whether it imports here, its backend, devices found."""
    rows = []
    for device_type, plugin in {"cpu": None, **device_types(kinds)}.items():
        known = dl.DEVICE_TYPES.get(device_type)
        backend = known.backend if known else next(
            (k.backend for k in kinds.values() if k.device_type == device_type), None)
        problem = dl.plugin_problem(plugin)
        if known is None and plugin is None:
            problem = "is not public or not declared"
        rows.append({"device_type": device_type, "plugin": plugin,
                     "plugin_installed": problem is None,
                     "plugin_problem": problem or "", "backend": backend,
                     "backend_available": dl.backend_available(backend),
                     "devices": dl.device_count(device_type) if problem is None else 0})
    return rows


def cluster_modes(c: Cluster) -> dict[str, dict[str, Any]]:
    """Per kind of the cluster: devices, and whether it would run real or emulated here."""
    present = present_kinds(c.kinds)
    out = {}
    for name, count in c.kind_counts().items():
        kind = c.kinds[name]
        found = count if kind.device_type == "cpu" else len(kind_devices(kind, present))
        problem = dl.real_problem(kind, count, found)
        real = kind.mode != "emulated" and problem is None
        why = "mode: emulated" if kind.mode == "emulated" else (problem or "")
        if kind.mode == "real" and problem is not None:
            why = f"FAILS (mode: real): {problem}"
        out[name] = {"devices": count, "mode": "real" if real else "emulated", "why": why}
    return out


@app.command()
@user_errors
def devices(
    cluster: Path | None = typer.Option(None, help="also list this cluster's kinds and modes"),
    json_path: Path | None = typer.Option(None, "--json", help="write what was found as JSON"),
) -> None:
    """Print the catalog of device kinds, the device layer and the devices present here."""
    from hetrain.cluster.loading import load_cluster

    c = load_cluster(cluster) if cluster is not None else None
    kinds = c.kinds if c is not None else CATALOG
    console = Console()
    console.print(_kinds_table(kinds))
    types = device_type_rows(kinds)
    tab = Table(title="Device layer: how torch reaches each device type here")
    for col in ("device type", "plugin", "installed", "backend", "registered", "devices"):
        tab.add_column(col)
    for row in types:
        builtin = "(built in)" if row["plugin_installed"] else "(undeclared)"
        tab.add_row(row["device_type"], row["plugin"] or builtin,
                    "yes" if row["plugin_installed"] else "no", row["backend"] or "-",
                    "yes" if row["backend_available"] else "no", str(row["devices"]))
    console.print(tab)
    found = local_devices(kinds)
    console.print(_found_table(found))
    report: dict[str, Any] = {"devices": [d.to_json() for d in found], "device_types": types,
                              "kinds": {k.name: _kind_json(k) for k in kinds.values()}}
    if c is not None:
        modes = cluster_modes(c)
        tab = Table(title=f"Cluster {c.name}: {len(c.devices)} devices")
        for col in ("kind", "count", "runs", "why"):
            tab.add_column(col)
        for name, m in modes.items():
            tab.add_row(name, str(m["devices"]), m["mode"], m["why"])
        console.print(tab)
        report["cluster"] = {"name": c.name, "kinds": modes}
    write_json(json_path, report)


def _kind_json(kind: DeviceKind) -> dict[str, Any]:
    return kind.model_dump(include={"vendor", "device_type", "plugin", "backend", "mode",
                                    "memory_gib", "source"})


def _kinds_table(kinds: dict[str, DeviceKind]) -> Table:
    table = Table(title="Device kinds (dense peak TFLOP/s)")
    cols = ("kind", "vendor", "device", "plugin", "backend", "bf16", "fp16", "fp32", "GiB")
    for col in cols:
        table.add_column(col, justify="right" if col in cols[5:] else "left",
                         no_wrap=col == "kind")
    for kind in kinds.values():
        tf = [f"{kind.flops[d] / 1e12:.0f}" if d in kind.flops else "-"
              for d in ("bf16", "fp16", "fp32")]
        table.add_row(kind.name, kind.vendor, kind.device_type, kind.plugin or "-",
                      kind.backend or "?", *tf, f"{kind.memory_gib:.0f}")
    return table


def _found_table(found: list) -> Table:
    table = Table(title="Devices on this machine")
    for col in ("torch device", "name", "kind", "vendor", "GiB", "usable", "note"):
        table.add_column(col)
    for dev in found:
        table.add_row(dev.torch_device, dev.name, dev.kind or "(not in catalog)", dev.vendor,
                      f"{dev.memory_gib:.0f}" if dev.memory_gib else "-",
                      "yes" if dev.usable else "no", dev.note)
    return table

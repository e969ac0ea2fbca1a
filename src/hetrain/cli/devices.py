"""`hetrain devices`: the catalog of kinds and the devices found on this machine."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import app, user_errors
from hetrain.cluster.discovery import local_devices
from hetrain.cluster.kinds import CATALOG


@app.command()
@user_errors
def devices(
    cluster: Path | None = typer.Option(None, help="also list this cluster's devices"),
) -> None:
    """Print the catalog of device kinds and the devices present here."""
    console = Console()
    table = Table(title="Device kinds (dense peak TFLOP/s)")
    for col in ("kind", "vendor", "backend", "bf16", "fp16", "tf32", "fp32", "GiB", "GB/s"):
        table.add_column(col, justify="left" if col in ("kind", "vendor", "backend") else "right")
    kinds = CATALOG
    if cluster is not None:
        from hetrain.cluster.loading import load_cluster

        kinds = load_cluster(cluster).kinds
    for kind in kinds.values():
        tf = [f"{kind.flops[d] / 1e12:.0f}" if d in kind.flops else "-"
              for d in ("bf16", "fp16", "tf32", "fp32")]
        table.add_row(kind.name, kind.vendor, kind.backend, *tf, f"{kind.memory_gib:.0f}",
                      f"{kind.memory_bandwidth_gbps:.0f}")
    console.print(table)
    found = Table(title="Devices on this machine")
    for col in ("torch device", "name", "kind", "GiB"):
        found.add_column(col)
    for dev in local_devices():
        found.add_row(dev.torch_device, dev.name, dev.kind or "(not in catalog)",
                      f"{dev.memory_gib:.0f}" if dev.memory_gib else "-")
    console.print(found)
    if cluster is not None:
        from hetrain.cluster.discovery import present_kinds
        from hetrain.cluster.loading import load_cluster

        c = load_cluster(cluster)
        present = present_kinds()
        tab = Table(title=f"Cluster {c.name}: {len(c.devices)} devices")
        for col in ("kind", "count", "runs"):
            tab.add_column(col)
        for kind, count in c.kind_counts().items():
            tab.add_row(kind, str(count), "present" if kind in present else "emulated")
        console.print(tab)

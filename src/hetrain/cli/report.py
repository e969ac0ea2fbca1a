"""Rich tables and JSON for run results; every line of an emulated run says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetrain.plan.io import atomic_write_text
from hetrain.runtime.results import RunResult

GIB = 1024**3


def emulated_tag(emulated: bool) -> str:
    return " (emulated)" if emulated else ""


def train_progress(console: Console, total: int, emulated: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]train{emulated_tag(emulated)}[/]"), BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tokens/s"), TimeElapsedColumn(),
        TextColumn("[yellow]{task.fields[note]}"),  # a suspect worker, while one is late
        console=console, transient=False)


def per_kind_table(result: RunResult) -> Table:
    table = Table(title=f"Per kind{emulated_tag(result.is_emulated)}")
    for col in ("kind", "devices", "share of work", "busy %", "tokens/s", "runs"):
        table.add_column(col, justify="left" if col in ("kind", "runs") else "right")
    for kind, k in result.per_kind.items():
        table.add_row(kind, str(k["devices"]), f"{k['share']:.1%}", f"{k['busy']:.1%}",
                      f"{k['tokens_per_s']:,.0f}",
                      "emulated" if kind in result.emulated else "real")
    return table


def per_group_table(result: RunResult) -> Table:
    table = Table(title=f"Stage groups: memory per device{emulated_tag(result.is_emulated)}")
    for col in ("group", "kind", "tp", "layers", "samples", "in flight", "est. MiB",
                "meas. MiB"):
        table.add_column(col, justify="left" if col in ("group", "kind") else "right")
    for name, g in result.per_group.items():
        table.add_row(name, g["kind"], str(len(g["devices"])),
                      f"{g['layers'][0]}-{g['layers'][1] - 1}", str(g["samples"]),
                      str(g["peak_in_flight"]), f"{g['estimated_bytes'] / 2**20:,.1f}",
                      f"{g['measured_bytes'] / 2**20:,.1f}")
    return table


def write_json(path: Path | str | None, data: dict[str, Any]) -> None:
    if path is not None:
        atomic_write_text(Path(path), json.dumps(data, indent=1, default=float) + "\n")

"""`hetrain` command line: devices, plan, simulate, train, bench, profile, export.

Every HetrainError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from hetrain.errors import HetrainError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train one model on a mix of accelerator kinds at once, exactly.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON figures.")
app.add_typer(bench_app, name="bench")
err_console = Console(stderr=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn HetrainError into one line and exit code 2 (usage/input error)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HetrainError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _register() -> None:
    # Each command lives in its own module; importing it registers it on `app`/`bench_app`.
    import importlib

    for name in ("devices", "train", "plan", "simulate", "profile", "checkpoint", "bench",
                 "bench_sim", "bench_recovery", "bench_tax"):
        try:
            importlib.import_module(f"hetrain.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"hetrain.cli.{name}":
                raise


_register()


def main() -> None:
    sys.exit(app())

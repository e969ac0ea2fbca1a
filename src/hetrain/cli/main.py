"""`hetrain` command line: devices, plan, simulate, train, bench, profile, export.

One error path for every command: an error becomes one plain line on stderr, `error: ...`,
and an exit code: 2 for bad input (a HetrainError, a bad option), 1 for a fault of the
machine (a lost worker, a full disk, a permission refused mid-run, a bug). Tracebacks only
with `hetrain --debug ...` (or HETRAIN_DEBUG=1).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from hetrain.errors import HetrainError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


def one_line(message: str) -> str:
    """The message's lines joined: one line on stderr, whatever the source wrote."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def print_error(message: str) -> None:
    # The message is plain text: file paths like `[/tmp/x]` must not be read as rich markup.
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)))


def error_exit_code(err: BaseException) -> tuple[int, str]:
    """(exit code, message) for an error that reached the command line."""
    if isinstance(err, HetrainError):
        return err.exit_code, str(err)
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return 1, f"{err.strerror or err}{where}"
    if isinstance(err, MemoryError):
        return 1, "out of memory; use a smaller cluster, model or batch"
    return 1, (f"internal error ({type(err).__name__}: {err}); rerun with `hetrain --debug` "
               "for the traceback and report it")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any error into one line and its exit code (2 input, 1 machine); --debug re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except Exception as err:
            if _state["debug"]:
                raise
            code, message = error_exit_code(err)
            print_error(message)
            raise typer.Exit(code) from None

    return wrapper


class OneLineGroup(TyperGroup):
    """Click's usage errors (a bad option value, a missing option) as one plain line too."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as err:
            # NoArgsIsHelpError: typer printed the help already.
            help_shown = type(err).__name__ == "NoArgsIsHelpError"
            code = err.exit_code if help_shown else _usage_error(err)
        except typer.Abort:
            print_error("aborted")
            code = 1
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_error(err: ClickException) -> int:
    ctx = getattr(err, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    print_error(err.format_message() + hint)
    return err.exit_code


app = typer.Typer(cls=OneLineGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Train one model on a mix of accelerator kinds at once, exactly.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON figures.")
app.add_typer(bench_app, name="bench")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks of errors")
          ) -> None:
    # Set on every invocation: one in-process run must not leave the next one in debug mode.
    _state["debug"] = debug or os.environ.get("HETRAIN_DEBUG", "") not in ("", "0")


def _register() -> None:
    # Each command lives in its own module; importing it registers it on `app`/`bench_app`.
    import importlib

    for name in ("devices", "train", "plan", "simulate", "profile", "checkpoint", "bench",
                 "bench_sim", "bench_recovery", "bench_tax", "bench_search", "data"):
        try:
            importlib.import_module(f"hetrain.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"hetrain.cli.{name}":
                raise


_register()


def main() -> None:
    sys.exit(app())

"""Shared checks for refused inputs: exit code, one line on stderr, no traceback, no worker
spawned, nothing written (in the working folder or the temporary folder)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.errors import HetrainError
from hetrain.runtime import launch

ROOT = Path(__file__).resolve().parents[1]
THREE = str(ROOT / "examples" / "clusters" / "three-kinds.yaml")
# Generated cases run by the fuzz tests in this session (printed in the terminal summary).
FUZZ_COUNTS: dict[str, int] = {}


class Reached(HetrainError):
    """Raised by the stand-in for spawning: the input passed every check."""

    exit_code = 99


@dataclass
class Sandbox:
    """A working folder and a temporary folder to watch, and the workers spawned."""

    work: Path
    scratch: Path
    spawned: list = field(default_factory=list)

    @classmethod
    def under(cls, root: Path) -> Sandbox:
        box = cls(root / "work", root / "tmp")
        box.work.mkdir(parents=True)
        box.scratch.mkdir()
        return box

    def spawn_stand_in(self, reach: type[Exception]):
        def spawn(job, ctx, progress, *_):
            self.spawned.append(job)
            raise reach("a worker was spawned")

        return spawn

    def snapshot(self) -> dict[str, bytes | None]:
        return {str(p.relative_to(self.work.parent)): (p.read_bytes() if p.is_file() else None)
                for root in (self.work, self.scratch) for p in sorted(root.rglob("*"))}


def make_sandbox(tmp_path: Path, monkeypatch) -> Sandbox:
    """For the `sandbox` fixture: work in tmp_path/work, temporary files in tmp_path/tmp,
    spawning workers recorded and refused."""
    box = Sandbox.under(tmp_path)
    monkeypatch.chdir(box.work)
    monkeypatch.setattr(tempfile, "tempdir", str(box.scratch))
    monkeypatch.setattr(launch, "_spawn_and_wait", box.spawn_stand_in(AssertionError))
    return box


@contextmanager
def sandboxed(root: Path, reach: type[Exception] = AssertionError) -> Iterator[Sandbox]:
    """The same as a context (for one generated case of a fuzz test); spawning raises
    `reach`."""
    box = Sandbox.under(root)
    cwd = os.getcwd()
    os.chdir(box.work)
    try:
        with mock.patch.object(tempfile, "tempdir", str(box.scratch)), \
                mock.patch.object(launch, "_spawn_and_wait", box.spawn_stand_in(reach)):
            yield box
    finally:
        os.chdir(cwd)


def cli_refused(box: Sandbox, args: list[str], *words: str, code: int = 2) -> str:
    """Run `hetrain args` in-process; assert it was refused as promised; return the line."""
    before = box.snapshot()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    if code == 2:  # refused input: before any output (a machine's fault comes mid-run)
        assert result.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not box.spawned, "a worker was spawned"
    assert box.snapshot() == before, "something was written"
    return lines[0]

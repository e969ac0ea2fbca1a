"""Shared checks for refused inputs: exit code, one line on stderr, no traceback, no worker
spawned, nothing written (in the working folder or the temporary folder)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.runtime import launch

ROOT = Path(__file__).resolve().parents[1]
THREE = str(ROOT / "examples" / "clusters" / "three-kinds.yaml")


@dataclass
class Sandbox:
    """A working folder and a temporary folder to watch, and the workers spawned."""

    work: Path
    scratch: Path
    spawned: list = field(default_factory=list)

    def snapshot(self) -> dict[str, bytes | None]:
        return {str(p.relative_to(self.work.parent)): (p.read_bytes() if p.is_file() else None)
                for root in (self.work, self.scratch) for p in sorted(root.rglob("*"))}


def make_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Work in tmp_path/work, temporary files in tmp_path/tmp; a spawn is recorded, refused."""
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    box = Sandbox(work, scratch)

    def spawn(job, ctx, progress):
        box.spawned.append(job)
        raise AssertionError("a worker was spawned")

    monkeypatch.setattr(launch, "_spawn_and_wait", spawn)
    return box


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

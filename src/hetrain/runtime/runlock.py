"""One owner per checkpoint folder, one run per folder, resume by default.

A checkpoint folder holds:

    .lock      flock(2)-ed by the launcher for the whole run, recovery attempts included;
               holds its pid. A second run pointed at the folder is refused at once.
    run.json   the folder's run: its id and identity (model, seed, global batch, sequence
               length, precision); every checkpoint's meta.json records the run id.

A new run into a folder holding checkpoints of the same identity continues it (resume is the
default); one of another identity is refused unless `fresh` (`--fresh`), which moves the old
run's checkpoints aside into `replaced-<run id>/`. A run already at `steps` raises RunComplete.
Resume and export read only the folder's run's checkpoints, so runs never mix.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hetrain.errors import CheckpointError
from hetrain.plan.io import atomic_write_text
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.layout import (
    LATEST,
    META,
    RUN,
    committed_steps,
    read_run,
    run_steps,
    step_dir,
)

LOCK = ".lock"
_held: dict[Path, int] = {}  # folders this process holds: reentrant for recovery attempts


class RunComplete(CheckpointError):
    """The folder's run already reached the requested number of steps: nothing to do."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def identity(config: TrainConfig, plan: Plan) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run exactly (the plan's layout may
    change: checkpoints reshard)."""
    return {"model": plan.model, "seed": config.seed, "global_batch": plan.global_batch,
            "seq_len": plan.seq_len, "precision": config.precision}


@contextmanager
def run_folder(config: TrainConfig, plan: Plan) -> Iterator[TrainConfig]:
    """Own `config.checkpoint_dir` for the block; yields the config to run (its run id set,
    `resume` as decided). Without a checkpoint folder, the config as it is."""
    if not config.checkpoint_dir:
        yield config
        return
    root = Path(config.checkpoint_dir).resolve()
    if root in _held:  # a recovery attempt of the run that holds it
        yield config
        return
    fd = _lock(root)
    _held[root] = fd
    try:
        yield _claim(root, config, plan)
    finally:
        del _held[root]
        os.close(fd)  # releases the flock


def _lock(root: Path) -> int:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CheckpointError(f"cannot use checkpoint folder {root}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CheckpointError(f"checkpoint folder {root} is in use by another run (process "
                              f"{holder}); wait for it to end or pick another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _claim(root: Path, config: TrainConfig, plan: Plan) -> TrainConfig:
    want = identity(config, plan)
    run = read_run(root) or _legacy_run(root)
    steps = run_steps(root)
    if run is not None and steps and config.fresh:
        _move_aside(root, run["run_id"])
    elif run is not None and steps:
        if not config.resume:
            raise CheckpointError(f"{root} holds checkpoints of run {run['run_id']} (up to "
                                  f"step {steps[0]}); resume it, or start over with --fresh "
                                  "(fresh=True), which moves them aside")
        if run.get("identity") != want:
            raise CheckpointError(f"{root} holds run {run['run_id']} of another model or shape "
                                  f"({_differences(run.get('identity'), want)}); pick another "
                                  "folder, or start over with --fresh (fresh=True), which moves "
                                  "its checkpoints aside")
        if steps[0] >= config.steps:
            raise RunComplete(f"the run in {root} is already at step {steps[0]} (steps "
                              f"{config.steps}); nothing to do", steps[0])
        return config.model_copy(update={"run_id": run["run_id"], "resume": True})
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(root / RUN, json.dumps({"run_id": run_id, "identity": want}) + "\n")
    return config.model_copy(update={"run_id": run_id, "resume": False})


def _legacy_run(root: Path) -> dict[str, Any] | None:
    """A folder written before run ids: its identity from the newest checkpoint's meta."""
    for step in committed_steps(root):
        try:
            meta = json.loads((step_dir(root, step) / META).read_text())
            plan = meta["plan"]
            return {"run_id": "legacy", "identity": {
                "model": meta["model"], "seed": meta["seed"], "global_batch":
                plan["global_batch"], "seq_len": plan["seq_len"],
                "precision": meta["precision"]}}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _differences(have: dict | None, want: dict) -> str:
    have = have or {}
    diff = [f"{k} {have.get(k)!r} there, {v!r} here" for k, v in want.items()
            if have.get(k) != v]
    return "; ".join(diff) or "unknown identity"


def _move_aside(root: Path, run_id: str) -> None:
    """--fresh: the old run's checkpoints leave the folder's top level (kept, never mixed)."""
    dest = root / f"replaced-{run_id}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"replaced-{run_id}-{n}"
    dest.mkdir()
    for path in list(root.glob("step-*")) + [root / LATEST, root / RUN]:
        if path.exists():
            shutil.move(str(path), dest / path.name)

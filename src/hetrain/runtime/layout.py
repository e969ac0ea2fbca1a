"""The names in a checkpoint folder, and which of its checkpoints belong to the folder's run.

Shared by the checkpoint writer and reader (runtime/checkpoint.py) and the folder's owner
(runtime/runlock.py); see checkpoint.py for the layout and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hetrain.errors import CheckpointError

FORMAT = "hetrain-checkpoint/1"
MANIFEST, META, LATEST, RUN = "manifest.json", "meta.json", "latest", "run.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def committed_steps(root: str | Path) -> list[int]:
    """Steps of the committed checkpoints under `root`, newest first."""
    root = Path(root)
    steps = []
    for path in root.glob("step-*") if root.is_dir() else []:
        digits = path.name.removeprefix("step-")
        if path.is_dir() and digits.isdigit():
            steps.append(int(digits))
    return sorted(steps, reverse=True)


def read_run(root: Path) -> dict[str, Any] | None:
    """The folder's run record (run.json); None when it has none."""
    try:
        run = json.loads((root / RUN).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{root / RUN} is unreadable ({err})") from None
    if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
        raise CheckpointError(f"{root / RUN} is not a hetrain run record")
    return run


def run_id_of(root: str | Path) -> str | None:
    """The run a checkpoint folder belongs to (None: a folder from before run ids)."""
    run = read_run(Path(root))
    return run["run_id"] if run else None


def run_steps(root: str | Path) -> list[int]:
    """Committed steps of the folder's own run (run.json), newest first: a checkpoint whose
    meta.json names another run is never a candidate (an unreadable one is left to the
    checksums to refuse)."""
    root = Path(root)
    run_id = run_id_of(root) if root.is_dir() else None
    if run_id is None:
        return committed_steps(root)
    return [s for s in committed_steps(root) if _run_of(step_dir(root, s)) in (run_id, None)]


def _run_of(path: Path) -> str | None:
    try:
        return json.loads((path / META).read_text()).get("run_id", "legacy")
    except (OSError, ValueError, AttributeError):
        return None

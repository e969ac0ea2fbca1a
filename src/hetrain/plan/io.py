"""Plan files: JSON or YAML, the general form or a shorthand; written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hetrain.cluster.loading import read_text_file
from hetrain.errors import PlanError


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_plan_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_text_file(path, "plan", PlanError)
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except RecursionError:
        raise PlanError(f"{path}: nested too deeply to be a plan file") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise PlanError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{err}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a mapping at the top level")
    return raw

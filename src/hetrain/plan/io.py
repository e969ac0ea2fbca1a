"""Plan files: JSON or YAML, the general form or a shorthand; written atomically; output
paths checked before any work."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hetrain.cluster.loading import read_text_file
from hetrain.errors import ConfigError, PlanError


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


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path.cwd()


def check_writable_file(path: str | Path | None, option: str) -> None:
    """`path` can be written (created with its missing folders) by this process; leaves
    nothing behind. ConfigError naming the option and the path otherwise."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if path.exists():
        try:  # opened for appending, nothing written; O_NONBLOCK: a FIFO must not hang here
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        except OSError as err:
            raise ConfigError(f"{option} {path}: the file cannot be written ({err.strerror}); "
                              "pick another path") from None
        return
    _check_creatable(path.parent, option, path)


def check_writable_dir(path: str | Path | None, option: str) -> None:
    """`path` is a writable folder, or one that can be created; leaves nothing behind."""
    if path is None or str(path) == "":
        return
    path = Path(path)
    try:  # one look: a folder another process makes or removes meanwhile is no file
        is_file = not stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        is_file = False  # absent (or unreadable: the check below names it)
    if is_file:
        raise ConfigError(f"{option} {path}: is a file, not a folder; pick a folder")
    _check_creatable(path, option, path)


def _check_creatable(folder: Path, option: str, path: Path) -> None:
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: {base} is a file, so nothing can be created under "
                          "it; pick another path")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "read-only" if _read_only_fs(base) else "not writable"
        raise ConfigError(f"{option} {path}: {base} is {why}; pick a writable folder")
    # os.access cannot see everything (root under /proc, quotas, ACLs): try, and undo, under
    # a name of its own (two processes checking the same path must not see each other's).
    try:
        if folder.absolute() != base.absolute():
            os.rmdir(tempfile.mkdtemp(dir=base, prefix=".hetrain-probe-"))
        else:
            fd, name = tempfile.mkstemp(dir=base, prefix=".hetrain-probe-")
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot create anything under {base} "
                          f"({err.strerror}); pick a writable folder") from None


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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

"""Load and validate a cluster YAML; every error names the field and the fix in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hetrain.cluster.kinds import ALIASES, CATALOG, DeviceKind
from hetrain.cluster.topology import Cluster
from hetrain.errors import ClusterError


def validation_message(err: ValidationError, source: str) -> str:
    """One line from pydantic's first error: `source: field.path: problem`."""
    first = err.errors()[0]
    loc = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in first["loc"])
    loc = loc.replace(".[", "[")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "missing required field; add it"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    got = first.get("input")
    if first["type"] not in ("missing",) and not isinstance(got, dict | list) and got is not None:
        msg += f" (got {got!r})"
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def resolve_kind_name(name: str, known: dict[str, DeviceKind]) -> str | None:
    if name in known:
        return name
    lowered = {k.lower(): k for k in known}
    key = name.lower()
    return lowered.get(key) or (ALIASES.get(key) if ALIASES.get(key) in known else None)


def _with_base(spec: Any, kinds: dict[str, DeviceKind]) -> Any:
    """A `kinds:` entry naming a known kind overrides only the fields it sets (e.g. BR104's
    plugin, device_type and backend, or `mode: real`); any other entry defines a new kind."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return spec
    name = resolve_kind_name(spec["name"], kinds)
    if name is None:
        return spec
    base = kinds[name].model_dump()
    if "device_type" in spec or "torch_device" in spec:
        # A new device type brings its own plugin and backend unless the entry names them.
        base = {k: v for k, v in base.items() if k not in ("plugin", "backend", "device_type")}
    return {**base, **spec, "name": name}


def cluster_from_dict(raw: Any, source: str = "cluster") -> Cluster:
    if not isinstance(raw, dict):
        raise ClusterError(f"{source}: expected a mapping with 'nodes:' at the top level")
    raw = dict(raw)
    kinds = dict(CATALOG)
    user_kinds = raw.pop("kinds", None) or []
    if isinstance(user_kinds, dict):
        user_kinds = [{"name": k, **v} for k, v in user_kinds.items()]
    for i, spec in enumerate(user_kinds):
        try:
            kind = DeviceKind.model_validate(_with_base(spec, kinds))
        except ValidationError as err:
            raise ClusterError(validation_message(err, f"{source}: kinds[{i}]")) from None
        kinds[kind.name] = kind
    nodes = raw.get("nodes")
    if isinstance(nodes, list):
        fixed = []
        for i, node in enumerate(nodes):
            if isinstance(node, dict) and isinstance(node.get("kind"), str):
                name = resolve_kind_name(node["kind"], kinds)
                if name is None:
                    raise ClusterError(
                        f"{source}: nodes[{i}].kind: unknown kind {node['kind']!r}; use one of "
                        f"{', '.join(sorted(kinds))} or define it under 'kinds:'"
                    )
                node = {**node, "kind": name}
            fixed.append(node)
        raw["nodes"] = fixed
    try:
        return Cluster.model_validate({**raw, "kinds": kinds})
    except ValidationError as err:
        raise ClusterError(validation_message(err, source)) from None


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ClusterError(f"{path}: cannot read the cluster file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ClusterError(f"{path}: YAML syntax error{where}: {problem}") from None
    return cluster_from_dict(raw, str(path))

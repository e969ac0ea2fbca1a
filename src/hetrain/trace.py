"""Step traces in the Chrome trace format (Perfetto, chrome://tracing), simulated or measured.

A leaf module: the simulator and the runtime both write their steps through it, so predicted
and measured timelines open side by side in the same viewer and the same Gantt drawing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetrain.errors import HetrainError

CATEGORIES = ("forward", "backward", "weight", "comm", "optimizer", "idle")
STREAMS = ("compute", "comm")
_US = 1e6  # Chrome traces count microseconds


class TraceError(HetrainError):
    """A trace file is missing, not JSON, or not a Chrome trace."""


@dataclass(frozen=True)
class TraceEvent:
    """One interval on one lane (a device id or a stage-group name).

    `stream` separates work that overlaps on one lane (compute vs. communication), since a
    viewer draws partly overlapping slices on one track wrongly. `kind` groups lanes into one
    process per device kind.
    """

    lane: str
    name: str  # "F3", "B3", "send", "recv", "allreduce", "optimizer"
    category: str  # one of CATEGORIES
    start_s: float
    dur_s: float
    args: dict[str, Any] = field(default_factory=dict, compare=False)
    kind: str = ""
    stream: str = "compute"

    @property
    def end_s(self) -> float:
        return self.start_s + self.dur_s


def _process_name(kind: str, emulated: bool) -> str:
    name = kind or "hetrain"
    return f"{name} (emulated)" if emulated else name


def chrome_trace(events: list[TraceEvent], metadata: dict[str, Any] | None = None) -> dict:
    """The trace as a JSON-ready dict: "X" complete events plus "M" process/thread names."""
    metadata = dict(metadata or {})
    emulated = bool(metadata.get("emulated", False))
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str], tuple[int, int]] = {}
    meta: list[dict] = []
    out: list[dict] = []
    for ev in events:
        if ev.category not in CATEGORIES:
            raise TraceError(f"trace event {ev.name!r}: category {ev.category!r} is not one of "
                             f"{', '.join(CATEGORIES)}")
        if ev.kind not in pids:
            pid = pids[ev.kind] = len(pids) + 1
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                         "args": {"name": _process_name(ev.kind, emulated)}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                         "args": {"sort_index": pid}})
        key = (ev.lane, ev.stream)
        if key not in tids:
            pid, tid = pids[ev.kind], len(tids) + 1
            tids[key] = (pid, tid)
            label = ev.lane if ev.stream == "compute" else f"{ev.lane} {ev.stream}"
            # lane/stream ride along in the thread's args so load_chrome_trace can rebuild events
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": label, "lane": ev.lane, "stream": ev.stream}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"sort_index": tid}})
        pid, tid = tids[key]
        out.append({"name": ev.name, "cat": ev.category, "ph": "X", "ts": ev.start_s * _US,
                    "dur": ev.dur_s * _US, "pid": pid, "tid": tid, "args": ev.args})
    other = {**metadata, "emulated": emulated,
             "kinds": {str(pid): kind for kind, pid in pids.items()}}
    return {"traceEvents": meta + out, "displayTimeUnit": "ms", "otherData": other}


def write_chrome_trace(events: list[TraceEvent], path: str | Path,
                       metadata: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events, metadata)) + "\n")


def load_chrome_trace(path: str | Path) -> tuple[list[TraceEvent], dict[str, Any]]:
    """Events and metadata (`otherData`) of a trace file; TraceError if it is malformed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise TraceError(f"{path}: cannot read the trace ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise TraceError(f"{path}: not valid JSON: {err}") from None
    return parse_chrome_trace(raw, str(path)), dict(raw.get("otherData", {}))


def parse_chrome_trace(raw: Any, source: str = "trace") -> list[TraceEvent]:
    if not isinstance(raw, dict) or not isinstance(raw.get("traceEvents"), list):
        raise TraceError(f"{source}: expected an object with a 'traceEvents' list")
    kinds = raw.get("otherData", {}).get("kinds", {})
    threads: dict[tuple[int, int], tuple[str, str]] = {}
    for i, ev in enumerate(raw["traceEvents"]):
        if not isinstance(ev, dict) or "ph" not in ev:
            raise TraceError(f"{source}: traceEvents[{i}] is not an event with a 'ph'")
        if ev["ph"] == "M" and ev.get("name") == "thread_name":
            args = ev.get("args", {})
            lane = args.get("lane", args.get("name", str(ev.get("tid"))))
            threads[(ev.get("pid"), ev.get("tid"))] = (lane, args.get("stream", "compute"))
    events = []
    for i, ev in enumerate(raw["traceEvents"]):
        if ev["ph"] != "X":
            continue
        missing = [k for k in ("name", "ts", "dur", "pid", "tid") if k not in ev]
        if missing:
            raise TraceError(f"{source}: traceEvents[{i}] lacks {', '.join(missing)}")
        if not all(isinstance(ev[k], int | float) for k in ("ts", "dur")):
            raise TraceError(f"{source}: traceEvents[{i}]: ts and dur must be numbers")
        if ev["ts"] < 0 or ev["dur"] < 0:
            raise TraceError(f"{source}: traceEvents[{i}] ({ev['name']}): negative ts or dur")
        lane, stream = threads.get((ev["pid"], ev["tid"]), (str(ev["tid"]), "compute"))
        category = ev.get("cat", "comm" if stream == "comm" else "forward")
        if category not in CATEGORIES:
            raise TraceError(f"{source}: traceEvents[{i}]: unknown category {category!r}")
        events.append(TraceEvent(lane=lane, name=str(ev["name"]), category=category,
                                 start_s=ev["ts"] / _US, dur_s=ev["dur"] / _US,
                                 args=dict(ev.get("args", {})),
                                 kind=kinds.get(str(ev["pid"]), ""), stream=stream))
    return events

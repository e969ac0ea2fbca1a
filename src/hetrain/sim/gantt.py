"""Gantt chart of a step: one row per lane (device), coloured by forward/backward/comm/idle.

Takes plain TraceEvents, so it draws simulated and measured (runtime) steps alike. Uses the
Agg canvas directly, never pyplot, so it works headless and leaves no global figure state.
"""

from __future__ import annotations

from pathlib import Path

from hetrain.trace import TraceEvent

COLOURS = {"forward": "#4c78a8", "backward": "#f58518", "weight": "#e45756", "comm": "#54a24b",
           "optimizer": "#b279a2", "idle": "#e4e4e4"}
_LABEL_LIMIT = 300  # write "F3"/"B3" on the bars only when there are few enough to read


def draw_gantt(events: list[TraceEvent], path: str | Path, *, title: str | None = None,
               lanes: list[str] | None = None, max_lanes: int = 64) -> Path:
    """Write a PNG of the events; `lanes` picks and orders the rows (default: all, in order of
    first appearance, at most `max_lanes`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    order = lanes if lanes is not None else list(dict.fromkeys(e.lane for e in events))
    shown = order[:max_lanes]
    row = {lane: i for i, lane in enumerate(shown)}
    end_s = max((e.end_s for e in events), default=0.0) or 1.0
    scale, unit = (1e3, "ms") if end_s < 10 else (1.0, "s")

    fig = Figure(figsize=(12, min(0.32 * len(shown) + 1.6, 40)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    for e in events:
        if e.lane in row:
            bars.setdefault((row[e.lane], e.category, e.stream), []).append(
                (e.start_s * scale, e.dur_s * scale))
    # Idle first, as a background: whatever it does not cover is idle time.
    for i in range(len(shown)):
        ax.broken_barh([(0, end_s * scale)], (i - 0.4, 0.8), color=COLOURS["idle"], lw=0)
    for (i, category, stream), spans in bars.items():
        # Communication overlaps compute on its lane: draw it as a thin bar along the bottom.
        y, h = (i + 0.1, 0.3) if stream == "comm" else (i - 0.4, 0.8)
        ax.broken_barh(spans, (y, h), color=COLOURS.get(category, "grey"), lw=0.3,
                       edgecolor="white")
    compute = [e for e in events
               if e.lane in row and e.category in ("forward", "backward", "weight")]
    if len(compute) <= _LABEL_LIMIT:
        for e in compute:
            ax.text((e.start_s + e.dur_s / 2) * scale, row[e.lane], e.name, ha="center",
                    va="center", fontsize=6, color="white", clip_on=True)
    ax.set_yticks(range(len(shown)), shown, fontsize=7)
    ax.set_ylim(max(len(shown), 1) - 0.5, -0.5)
    ax.set_xlim(0, end_s * scale)
    ax.set_xlabel(f"time ({unit})")
    more = f" (first {len(shown)} of {len(order)} lanes)" if len(order) > len(shown) else ""
    ax.set_title((title or "step") + more, loc="left", fontsize=10)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(COLOURS), fontsize=8,
              frameon=False, borderaxespad=0.2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

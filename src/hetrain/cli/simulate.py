"""`hetrain simulate`: predict one step of a plan, print where time goes, draw and trace it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import app, user_errors
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.errors import SimError
from hetrain.plan.types import Plan
from hetrain.sim.result import DeviceTime, SimResult

_TABLE_DEVICES = 32  # above this, the table shows one row per kind
_GANTT_DEVICES = 64  # above this, the Gantt chart shows one device per distinct stage


def _cost(cluster: Cluster, spec, profile_path: Path | None) -> CostModel:
    """The catalog's roofline, or the measured figures of a profile where it has the kind."""
    prof = None
    if profile_path is not None:
        from hetrain.cost.profile import Profile

        prof = Profile.load(profile_path)
        prof.check_layers(spec.n_layers, spec.name)
    return CostModel(cluster, spec, prof)


def _load(cluster_path: Path, plan_path: Path | None, model: str | None,
          global_batch: int | None, seq_len: int | None, dtype: str,
          profile_path: Path | None = None) -> tuple[Cluster, Plan, CostModel]:
    from hetrain.cluster.loading import load_cluster
    from hetrain.model.loading import load_model, model_and_seq_len

    cluster = load_cluster(cluster_path)
    if plan_path is not None:
        from hetrain.plan import load_plan

        plan = load_plan(plan_path, cluster)
        # --model names the plan's model when the plan's own field does not resolve here.
        spec = load_model(model or plan.model).spec(plan.seq_len)
        return cluster, plan, _cost(cluster, spec, profile_path)
    if model is None or global_batch is None:
        raise SimError("give --plan, or --model and --global-batch to simulate the "
                       "speed-proportional data-parallel plan")
    from hetrain.planner import data_parallel_plan

    source, seq = model_and_seq_len(model, seq_len)
    cost = _cost(cluster, source.spec(seq), profile_path)
    return cluster, data_parallel_plan(cluster, cost, global_batch, dtype=dtype), cost


def _check(plan: Plan, cluster: Cluster, cost: CostModel, memory: bool):
    """Refuse an invalid plan (PlanError names the problem); return its schedule."""
    from hetrain.plan.schedule import build_schedule
    from hetrain.plan.validate import check_memory, plan_memory_fn, validate_plan

    validate_plan(plan, cluster, cost.spec)
    schedule = build_schedule(plan, cost)
    if memory:
        check_memory(plan, cluster, plan_memory_fn(plan, cost),
                     peak_in_flight=schedule.peak_in_flight)
    return schedule


def _representative_lanes(plan: Plan) -> list[str]:
    """First device of the first group of each (kind, layers): the TP ranks of a group and
    the replicas of a stage run alike, so one row stands for all of them."""
    seen: dict[tuple[str, tuple[int, int]], str] = {}
    for g in plan.stage_groups:
        seen.setdefault((g.kind, tuple(g.layers)), g.devices[0])
    return list(seen.values())


def _mean_pct(devices: list[DeviceTime], attr: str) -> str:
    return f"{100 * sum(getattr(d, attr) for d in devices) / len(devices):.1f}%"


def _table(result: SimResult) -> Table:
    table = Table(title=f"Simulated step: {result.step_s * 1e3:.1f} ms, "
                        f"{result.tokens_per_s:,.0f} tokens/s, exposed comm "
                        f"{result.exposed_comm_s * 1e3:.1f} ms")
    rows: dict[str, list[DeviceTime]] = {}
    many = len(result.devices) > _TABLE_DEVICES
    for d in result.devices.values():
        rows.setdefault(d.kind if many else d.device, []).append(d)
    for col in ("kind" if many else "device", "group", "busy", "bubble", "of it imbalance",
                "comm wait", "idle"):
        table.add_column(col, justify="left" if col in ("device", "kind", "group") else "right")
    for key, devs in rows.items():
        groups = {d.group for d in devs}
        table.add_row(f"{key} (x{len(devs)})" if many else key,
                      devs[0].group if len(groups) == 1 else f"{len(groups)} groups",
                      *(_mean_pct(devs, attr) for attr in
                        ("busy_share", "bubble_share", "imbalance_share", "comm_wait_share",
                         "idle_share")))
    return table


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def _path_line(path: dict) -> str:
    b = path["bottleneck"]
    layers = f"layers {b['layers'][0]}-{b['layers'][1] - 1}"
    return (f"critical path of the pipelines ({_seconds(path['pipeline_s'])}): fill "
            f"{_seconds(path['fill_s'])} ({path['fill_actions']} actions) -> {b['group']} "
            f"({b['kind']}, {layers}, tp {b['tp']}) {b['actions']} actions back to back, "
            f"{_seconds(b['busy_s'])} -> drain {_seconds(path['drain_s'])} "
            f"({path['drain_actions']} actions)")


@app.command()
@user_errors
def simulate(
    cluster: Path = typer.Option(..., help="cluster YAML"),
    plan: Path | None = typer.Option(None, help="plan file (JSON or YAML, general or shorthand)"),
    model: str | None = typer.Option(None, help="the model (a built-in name, a Hugging Face "
                                     "config.json or folder, a model YAML); without --plan: "
                                     "simulate its data-parallel plan (speed-proportional "
                                     "shares); with --plan: the plan's model"),
    global_batch: int | None = typer.Option(None, help="samples per step, with --model"),
    seq_len: int | None = typer.Option(None, help="with --model (default: the model's)"),
    dtype: str = typer.Option("fp32", help="with --model: the plan's dtype"),
    png: Path | None = typer.Option(None, help="write a Gantt chart of the step (PNG)"),
    trace: Path | None = typer.Option(None, help="write a Chrome trace (Perfetto)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the figures as JSON"),
    memory_check: bool = typer.Option(True, help="refuse plans over a device's memory"),
    profile: Path | None = typer.Option(None, help="measured costs from 'hetrain profile'"),
) -> None:
    """Predict one training step of a plan: step time, tokens/s, busy/bubble/comm per device."""
    from hetrain.plan.io import atomic_write_text, check_writable_file

    for path, option in ((png, "--png"), (trace, "--trace"), (json_out, "--json")):
        check_writable_file(path, option)
    from hetrain.sim.simulate import simulate_plan

    c, p, cost = _load(cluster, plan, model, global_batch, seq_len, dtype, profile)
    schedule = _check(p, c, cost, memory_check)
    result = simulate_plan(p, c, cost, schedule=schedule)
    Console().print(_table(result))
    from hetrain.plan.schedule import critical_path_summary

    path = critical_path_summary(p, schedule)
    if path["segments"]:
        Console().print(_path_line(path))
    meta = {"source": "simulator", "emulated": False, "cluster": c.name, "model": p.model,
            "step_s": result.step_s, "tokens_per_s": result.tokens_per_s}
    if trace is not None:
        from hetrain.trace import write_chrome_trace

        write_chrome_trace(result.events, trace, meta)
        Console().print(f"trace: {trace} (open in https://ui.perfetto.dev)")
    if png is not None:
        from hetrain.sim.gantt import draw_gantt

        title = f"{p.model} on {c.name}: {result.step_s * 1e3:.1f} ms/step (simulated)"
        lanes = None
        if len(result.devices) > _GANTT_DEVICES:
            lanes = _representative_lanes(p)
            title += ", one device per distinct stage"
        draw_gantt(result.events, png, lanes=lanes, title=title)
        Console().print(f"gantt: {png}")
    if json_out is not None:
        out = {**result.to_dict(), "critical_path": path, "model": p.model, "cluster": c.name,
               "global_batch": p.global_batch, "seq_len": p.seq_len, "source": "simulator"}
        atomic_write_text(json_out, json.dumps(out, indent=1) + "\n")

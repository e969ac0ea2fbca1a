"""`hetrain bench sim`: the simulator's accuracy, as a figure. A set of small plans (data
parallel, a mixed pipeline, uneven pipelines, tensor parallel, pipelines side by side, a
zero-bubble pipeline, and pipelines of three shapes whose gradient sync is fragmented into
many buckets summed under backward, with a sharded optimizer) runs for real (emulated kinds
paced); the same plans are then simulated with the runs' measured
stage, transfer, all-reduce and optimizer times as the cost model. Reported per plan: the
measured and predicted step and their error; over all plans the largest error."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import bench_app, user_errors
from hetrain.cli.report import emulated_tag, write_json
from hetrain.cluster.loading import cluster_from_dict, load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.cost.measured import MeasuredCost, MeasuredFigures
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus, default_corpus
from hetrain.errors import PlanError
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan.expand import expand_plan
from hetrain.plan.io import check_writable_file
from hetrain.plan.schedule import build_schedule
from hetrain.plan.types import Plan, StageGroup
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import calibrate_time_scale, train
from hetrain.runtime.results import RunResult, steady_step_s
from hetrain.sim.calibrate import measured_figures
from hetrain.sim.simulate import simulate_plan

# examples/clusters/test-mixed.yaml, built in so the bench runs from an installed package.
DEFAULT_CLUSTER = {"name": "test-mixed", "nodes": [
    {"name": "h100", "kind": "H100", "count": 4},
    {"name": "a100", "kind": "A100-80GB", "count": 4},
    {"name": "br104", "kind": "BR104", "count": 2}]}
STEPS = 6  # per run; the first (warm-up) is left out of the figures
STRETCH = 2.0  # time scale over the calibrated one
PLAN_NAMES = ("data-parallel", "pipeline-3-kinds", "uneven-pipelines", "tensor-parallel",
              "pipelines-x2", "zero-bubble", "sequence-pieces", "overlapped-sync",
              "half-layers")


def bench_plans(cluster: Cluster, cost: CostModel, micro_batch_size: int = 2,
                names: tuple[str, ...] = PLAN_NAMES) -> dict[str, Plan]:
    """The bench's plans on a cluster of three kinds or more (the first two with two devices
    each or more): every way hetrain splits work appears, on few workers each (emulated
    workers share this machine's cores, and contention is not what is measured)."""
    kinds = list(cluster.kind_counts())
    if len(kinds) < 3 or any(cluster.kind_counts()[k] < 2 for k in kinds[:2]):
        raise PlanError("bench sim needs a cluster of three kinds or more, the first two with "
                        "two devices each or more")
    a, b, c = kinds[:3]
    spec = cost.spec
    n = spec.n_layers
    third, half, two_thirds = round(n / 3), n // 2, round(2 * n / 3)
    # in half layers (the embedding, then each block's attention and MLP halves, the head):
    # the cuts at `third` and `two_thirds` moved on by an attention half, into a block
    in_block = (2 * third, 2 * two_thirds, spec.units(True).n_layers)

    def pipelines(*routes: tuple[int, list[tuple[str, int, int, int]]]) -> Plan:
        return expand_plan({"model": spec.name, "seq_len": spec.seq_len,
                            "micro_batch_size": micro_batch_size, "pipelines": [
                                {"micro_batches": mbs, "stages": [
                                    {"kind": k, "tp": tp, "layers": [lo, hi]}
                                    for k, tp, lo, hi in stages]}
                                for mbs, stages in routes]}, cluster)

    def data_parallel() -> Plan:
        keep = {a: 2, b: 2, c: 1}
        drop = {d.id for k in kinds for d in cluster.devices_of(k)[keep.get(k, 0):]}
        sub = cluster.without(drop)
        return data_parallel_plan(sub, CostModel(sub, spec), 4 * micro_batch_size * 5,
                                  micro_batch_size=micro_batch_size)

    def tensor_parallel() -> Plan:
        # TP on the kind whose paced TP stage is slowest: an emulated TP group computes for
        # real on CPU with its collectives, which must fit in the paced time to be emulated.
        pairs = [k for k in kinds if cluster.kind_counts()[k] >= 2]
        tp_kind = max(pairs, key=lambda k: cost.stage_compute_s(StageGroup(
            name="tp", kind=k, devices=[d.id for d in cluster.devices_of(k)[:2]],
            layers=(0, half)), "forward", micro_batch_size, spec.seq_len))
        x = next(k for k in pairs if k != tp_kind)
        y = next(k for k in kinds if k not in (tp_kind, x))
        return pipelines((3, [(tp_kind, 2, 0, half), (x, 1, half, n)]),
                         (4, [(y, 1, 0, half), (x, 1, half, n)]))

    build = {
        "data-parallel": data_parallel,
        "pipeline-3-kinds": lambda: pipelines(
            (6, [(a, 1, 0, third), (c, 1, third, two_thirds), (b, 1, two_thirds, n)])),
        "uneven-pipelines": lambda: pipelines(
            (4, [(a, 1, 0, third), (c, 1, third, two_thirds), (b, 1, two_thirds, n)]),
            (3, [(a, 1, 0, half), (b, 1, half, n)])),
        "tensor-parallel": tensor_parallel,
        "pipelines-x2": lambda: pipelines(
            (4, [(a, 1, 0, half), (b, 1, half, n)]),
            (4, [(a, 1, 0, half), (b, 1, half, n)])),
        "zero-bubble": lambda: with_schedule(pipelines(
            (6, [(a, 1, 0, third), (c, 1, third, two_thirds), (b, 1, two_thirds, n)]))),
        # each micro-batch in two sequence pieces (attention reads the earlier piece's keys)
        "sequence-pieces": lambda: with_schedule(pipelines(
            (4, [(a, 1, 0, third), (c, 1, third, two_thirds), (b, 1, two_thirds, n)])),
            seq_chunks=2),
        # three shapes: every layer range has its own holders, so sync is many small sums
        "overlapped-sync": lambda: with_schedule(pipelines(
            (3, [(a, 1, 0, third), (c, 1, third, two_thirds), (b, 1, two_thirds, n)]),
            (3, [(a, 1, 0, half), (b, 1, half, n)]),
            (3, [(a, 1, 0, two_thirds), (b, 1, two_thirds, n)])), sharded_optimizer=True),
        # stages cut between a block's attention and MLP halves
        "half-layers": lambda: with_schedule(pipelines(
            (6, [(a, 1, 0, in_block[0]), (c, 1, *in_block[:2]), (b, 1, *in_block[1:])])),
            half_layers=True),
    }
    return {name: build[name]() for name in names}


def with_schedule(plan: Plan, sharded_optimizer: bool = False, seq_chunks: int = 1,
                  half_layers: bool = False) -> Plan:
    """The plan under the zero-bubble schedule (split backward), optionally with ZeRO-1, its
    micro-batches in sequence pieces, its layer ranges in half layers."""
    return Plan.model_validate({**plan.model_dump(), "schedule": "zero_bubble",
                                "sharded_optimizer": sharded_optimizer,
                                "seq_chunks": seq_chunks, "half_layers": half_layers})


def measure_plans(cluster: Cluster, plans: dict[str, Plan], config: TrainConfig,
                  corpus: Corpus, time_scale: float) -> dict[str, RunResult]:
    """Run each plan with its trace on, one after another (they share this machine's cores)."""
    config = config.model_copy(update={"trace": True})
    return {name: train(cluster, plan, config, corpus=corpus, time_scale=time_scale)
            for name, plan in plans.items()}


def compare(cluster: Cluster, cost: CostModel, plans: dict[str, Plan],
            runs: dict[str, RunResult]) -> tuple[list[dict[str, Any]], MeasuredCost]:
    """Fit one MeasuredCost to all runs' steady steps, simulate each plan on it in the schedule
    order the runtime executed, and set each median steady step beside its prediction."""
    schedules = {name: build_schedule(plan, cost) for name, plan in plans.items()}
    figures = MeasuredFigures()
    for name, run in runs.items():
        figures.merge(measured_figures(plans[name], cost, schedules[name], run.events))
    measured_cost = MeasuredCost(cluster, cost.spec, figures)
    rows = []
    for name, plan in plans.items():
        measured_s = steady_step_s(runs[name].step_s)
        predicted_s = simulate_plan(plan, cluster, measured_cost, schedule=schedules[name],
                                    trace=False).step_s
        rows.append({"name": name, "measured_step_s": measured_s,
                     "predicted_step_s": predicted_s,
                     "error_pct": 100 * (predicted_s - measured_s) / measured_s,
                     "devices": len(plan.devices()), "routes": len(plan.routes),
                     "max_tp": max(g.tp for g in plan.stage_groups),
                     "measured_steps_s": runs[name].step_s, "late_s": runs[name].late_s})
    return rows, measured_cost


def bench_sim(cluster: Cluster, model: str = "tiny", seq_len: int = 64, steps: int = STEPS,
              micro_batch_size: int = 2, time_scale: float | None = None,
              names: tuple[str, ...] = PLAN_NAMES, corpus: Corpus | None = None) -> dict:
    """Run the plans, fit the measured cost model, simulate, report the errors."""
    spec = model_spec(model_config(model), seq_len)
    cost = CostModel(cluster, spec)
    plans = bench_plans(cluster, cost, micro_batch_size, names)
    config = TrainConfig(model=model, steps=steps, trace=True)
    # The data only has to be there: a small corpus pickles fast to each worker.
    corpus = corpus or default_corpus(config.seed, max_bytes=1_000_000)
    # One stretch for all runs: the largest any plan needs, with headroom, so that the real
    # work and this machine's scheduling noise stay small beside the paced compute.
    scale = time_scale or STRETCH * max(
        calibrate_time_scale(plan, cost, corpus, config) for plan in plans.values())
    runs = measure_plans(cluster, plans, config, corpus, scale)
    rows, measured_cost = compare(cluster, cost, plans, runs)
    errors = [abs(r["error_pct"]) for r in rows]
    return {
        "plans": rows,
        "max_abs_error_pct": max(errors),
        "mean_abs_error_pct": statistics.fmean(errors),
        "emulated": any(r.is_emulated for r in runs.values()),
        "time_scale": scale, "model": model, "seq_len": seq_len, "steps": steps,
        "micro_batch_size": micro_batch_size, "profile": measured_cost.summary(),
    }


def _print(console: Console, out: dict[str, Any]) -> None:
    tag = emulated_tag(out["emulated"])
    table = Table(title="bench sim: simulator against measured runs" + tag)
    for col in ("plan", "devices", "measured step (ms)", "predicted step (ms)", "error"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in out["plans"]:
        table.add_row(r["name"], str(r["devices"]), f"{1e3 * r['measured_step_s']:,.1f}",
                      f"{1e3 * r['predicted_step_s']:,.1f}", f"{r['error_pct']:+.1f}%")
    console.print(table)


@bench_app.command("sim")
@user_errors
def sim(
    cluster: Path | None = typer.Option(
        None, help="cluster YAML of three kinds or more; default: the test-mixed example"),
    model: str = typer.Option("tiny"),
    seq_len: int = typer.Option(64, min=2),
    micro_batch_size: int = typer.Option(2, min=1),
    steps: int = typer.Option(STEPS, min=3, help="steps per run; the first is left out"),
    time_scale: float | None = typer.Option(None, help="emulation stretch; default calibrated"),
    plans: str = typer.Option(",".join(PLAN_NAMES), help="comma-separated plans to run"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """Simulator accuracy: small plans run for real, then simulated on the measured times."""
    check_writable_file(json_path, "--json")
    console = Console()
    t0 = time.perf_counter()
    names = tuple(n.strip() for n in plans.split(",") if n.strip())
    unknown = sorted(set(names) - set(PLAN_NAMES))
    if unknown or not names:
        raise PlanError(f"unknown plan(s) {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(PLAN_NAMES)}")
    nodes = load_cluster(cluster) if cluster else cluster_from_dict(DEFAULT_CLUSTER)
    out = bench_sim(nodes, model, seq_len, steps, micro_batch_size, time_scale, names)
    _print(console, out)
    console.print(f"max |error| {out['max_abs_error_pct']:.1f}%, mean "
                  f"{out['mean_abs_error_pct']:.1f}%{emulated_tag(out['emulated'])}; "
                  f"{time.perf_counter() - t0:.0f} s", highlight=False)
    write_json(json_path, out)

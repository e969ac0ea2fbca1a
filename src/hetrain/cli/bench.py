"""`hetrain bench dp|pp|sim`: measured figures written as JSON. Every run of a bench shares one
emulation time scale, and variants run interleaved in rounds (median, min, max), so the runs
compare on a machine whose load changes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli import bench_soak as _soak  # noqa: F401 - registers `bench soak`
from hetrain.cli.main import bench_app, user_errors
from hetrain.cli.report import emulated_tag, write_json
from hetrain.cluster.loading import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus
from hetrain.data.loading import load_corpus
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan.io import check_writable_file
from hetrain.plan.types import Plan, Route, StageGroup
from hetrain.planner.balance import balanced_layer_split, even_layer_split
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import calibrate_time_scale, train
from hetrain.runtime.results import RunResult
from hetrain.sim.simulate import simulate_plan

T = TypeVar("T")


def _measure(cluster: Cluster, plan: Plan, config: TrainConfig, scale: float,
             corpus: Corpus) -> RunResult:
    return train(cluster, plan, config, corpus=corpus, time_scale=scale)


def interleaved_runs(run: Callable[[str], T], names: list[str], rounds: int
                     ) -> list[dict[str, T]]:
    """Every variant once per round, the order rotated each round: a load that comes and goes
    on the machine then weighs on all variants alike, and figures compare within a round."""
    out = []
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        out.append({name: run(name) for name in order})
    return out


def spread(out: dict, name: str, values: list[float]) -> None:
    """`name`: the median of the rounds' values; `name_min`, `name_max`: their range."""
    out[name] = statistics.median(values)
    out[f"{name}_min"] = min(values)
    out[f"{name}_max"] = max(values)


def spread_by_key(out: dict, name: str, values: list[dict[str, float]]) -> None:
    """spread() of each key of per-round dicts, as three dicts `name`, `name_min`, `name_max`."""
    per_key: dict[str, dict] = {}
    for key in values[0]:
        spread(per_key.setdefault(key, {}), "v", [v[key] for v in values])
    for suffix in ("", "_min", "_max"):
        out[name + suffix] = {k: d["v" + suffix] for k, d in per_key.items()}


def late_s_max(runs: list[dict[str, RunResult]]) -> dict[str, float]:
    """Per variant, the most emulated work that overran its paced duration in any round: near
    zero when the emulation held the kinds' speeds."""
    return {name: max(rnd[name].late_s for rnd in runs) for name in runs[0]}


def _print(console: Console, title: str, rows: dict[str, tuple[float, float, float]],
           emulated: bool) -> None:
    table = Table(title=title + emulated_tag(emulated))
    table.add_column("run")
    for col in ("tokens/s median", "min", "max"):
        table.add_column(col + emulated_tag(emulated), justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{v:,.0f}" for v in values))
    console.print(table)


def _row(out: dict, name: str, key: str | None = None) -> tuple[float, float, float]:
    if key is None:
        return out[name], out[f"{name}_min"], out[f"{name}_max"]
    return out[name][key], out[f"{name}_min"][key], out[f"{name}_max"][key]


def bench_dp(cluster: Cluster, model: str, global_batch: int, seq_len: int, steps: int,
             time_scale: float | None = None, rounds: int = 3) -> dict:
    """Each kind alone, all kinds with an even split (plain DDP), all with hetrain's split,
    interleaved in `rounds` rounds. Efficiency and speedup are taken within each round."""
    spec = model_spec(model_config(model), seq_len)
    cost = CostModel(cluster, spec)
    config = TrainConfig(model=model, steps=steps)
    hetero = data_parallel_plan(cluster, cost, global_batch)
    corpus = load_corpus(config.data, config.seed)  # read once for every run of the bench
    scale = time_scale or calibrate_time_scale(hetero, cost, corpus, config)
    kinds = list(cluster.kind_counts())
    plans = {f"alone {k}": data_parallel_plan(cluster, cost, global_batch, kinds=[k])
             for k in kinds}
    plans |= {"even": data_parallel_plan(cluster, cost, global_batch, even=True),
              "hetrain": hetero}
    runs = interleaved_runs(lambda name: _measure(cluster, plans[name], config, scale, corpus),
                            list(plans), rounds)
    alone = [{k: rnd[f"alone {k}"].tokens_per_s for k in kinds} for rnd in runs]
    ours = [rnd["hetrain"].tokens_per_s for rnd in runs]
    even = [rnd["even"].tokens_per_s for rnd in runs]
    out: dict = {}
    spread_by_key(out, "standalone_tokens_per_s", alone)
    spread(out, "even_tokens_per_s", even)
    spread(out, "hetrain_tokens_per_s", ours)
    spread(out, "efficiency", [o / sum(a.values()) for o, a in zip(ours, alone, strict=True)])
    spread(out, "speedup_vs_even", [o / e for o, e in zip(ours, even, strict=True)])
    final = runs[-1]["hetrain"]
    return out | {
        "late_s_max": late_s_max(runs),
        "shares": {g.devices[0]: hetero.samples_of(g.name) for g in hetero.stage_groups},
        "hetrain_final_loss": final.final_loss,
        "emulated": any(r.is_emulated for rnd in runs for r in rnd.values()),
        "rounds": rounds, "time_scale": scale, "model": model, "global_batch": global_batch,
        "seq_len": seq_len, "steps": steps,
    }


def pipeline_plan(cluster: Cluster, cost: CostModel, kinds: list[str],
                  layers: list[tuple[int, int]], micro_batches: int, micro_batch_size: int
                  ) -> Plan:
    groups = [StageGroup(name=f"s{s}", kind=k, devices=[cluster.devices_of(k)[0].id],
                         layers=lay) for s, (k, lay) in enumerate(zip(kinds, layers, strict=True))]
    route = Route(stages=[g.name for g in groups], micro_batches=micro_batches,
                  micro_batch_size=micro_batch_size)
    return Plan(model=cost.spec.name, seq_len=cost.spec.seq_len,
                global_batch=micro_batches * micro_batch_size, stage_groups=groups,
                routes=[route])


def bench_pp(cluster: Cluster, model: str, micro_batches: int, micro_batch_size: int,
             seq_len: int, steps: int, time_scale: float | None = None, rounds: int = 3
             ) -> dict:
    """One pipeline over one device of each kind (fastest first): even layer split against
    the split balanced by kind speed, that balanced split under the zero-bubble schedule
    (split backward, in-flight scale 1.5) against it under 1F1B, and zero-bubble with each
    micro-batch in two sequence pieces against whole sequences, interleaved in `rounds`
    rounds."""
    spec = model_spec(model_config(model), seq_len)
    cost = CostModel(cluster, spec)
    kinds = sorted(cluster.kind_counts(), key=lambda k: -cost.tokens_per_s(k, "fp32"))
    config = TrainConfig(model=model, steps=steps)
    even_layers = even_layer_split(spec.n_layers, len(kinds))
    balanced_layers = balanced_layer_split(cost, kinds, micro_batch_size)
    even = pipeline_plan(cluster, cost, kinds, even_layers, micro_batches, micro_batch_size)
    balanced = pipeline_plan(cluster, cost, kinds, balanced_layers, micro_batches,
                             micro_batch_size)
    corpus = load_corpus(config.data, config.seed)  # read once for every run of the bench
    scale = time_scale or calibrate_time_scale(balanced, cost, corpus, config)
    zero_bubble = Plan.model_validate({
        **balanced.model_dump(), "schedule": "zero_bubble",
        "stage_groups": [g.model_dump() | {"in_flight_scale": 1.5}
                         for g in balanced.stage_groups]})
    pieces = Plan.model_validate({**zero_bubble.model_dump(), "seq_chunks": 2})
    plans = {"even": even, "balanced": balanced, "zero-bubble": zero_bubble, "pieces": pieces}
    runs = interleaved_runs(lambda name: _measure(cluster, plans[name], config, scale, corpus),
                            list(plans), rounds)
    r_even = [rnd["even"].tokens_per_s for rnd in runs]
    r_bal = [rnd["balanced"].tokens_per_s for rnd in runs]
    r_zb = [rnd["zero-bubble"].tokens_per_s for rnd in runs]
    r_pieces = [rnd["pieces"].tokens_per_s for rnd in runs]
    out: dict = {"kinds": kinds, "even_layers": even_layers, "balanced_layers": balanced_layers}
    spread(out, "even_tokens_per_s", r_even)
    spread(out, "balanced_tokens_per_s", r_bal)
    spread(out, "zero_bubble_tokens_per_s", r_zb)
    spread(out, "pieces_tokens_per_s", r_pieces)
    spread(out, "speedup", [b / e for b, e in zip(r_bal, r_even, strict=True)])
    # the same plan and layers: only the schedule differs
    spread(out, "zero_bubble_speedup", [z / b for z, b in zip(r_zb, r_bal, strict=True)])
    # the same plan again: only the sequence is cut in two pieces
    spread(out, "pieces_speedup", [p / z for p, z in zip(r_pieces, r_zb, strict=True)])
    simulated = {name: simulate_plan(plans[name], cluster, cost, trace=False).step_s
                 for name in ("balanced", "zero-bubble", "pieces")}
    out["zero_bubble_speedup_simulated"] = simulated["balanced"] / simulated["zero-bubble"]
    out["pieces_speedup_simulated"] = simulated["zero-bubble"] / simulated["pieces"]
    return out | {
        "late_s_max": late_s_max(runs),
        "emulated": any(r.is_emulated for rnd in runs for r in rnd.values()),
        "rounds": rounds, "time_scale": scale, "model": model, "micro_batches": micro_batches,
        "micro_batch_size": micro_batch_size, "seq_len": seq_len, "steps": steps,
    }


@bench_app.command("dp")
@user_errors
def dp(
    cluster: Path = typer.Option(..., help="cluster YAML"),
    model: str = typer.Option("tiny"),
    global_batch: int = typer.Option(240, min=1),
    seq_len: int = typer.Option(64, min=2),
    steps: int = typer.Option(6, min=2),
    time_scale: float | None = typer.Option(None, help="emulation stretch; default calibrated"),
    rounds: int = typer.Option(3, min=1, help="rounds of interleaved runs (median, min, max)"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """Data parallelism: each kind alone, an even split, and hetrain's speed-aware split."""
    check_writable_file(json_path, "--json")
    console = Console()
    t0 = time.perf_counter()
    out = bench_dp(load_cluster(cluster), model, global_batch, seq_len, steps, time_scale,
                   rounds)
    rows = {f"{k} alone": _row(out, "standalone_tokens_per_s", k)
            for k in out["standalone_tokens_per_s"]}
    rows |= {"all kinds, even split (DDP)": _row(out, "even_tokens_per_s"),
             "all kinds, hetrain split": _row(out, "hetrain_tokens_per_s")}
    _print(console, f"bench dp, {rounds} rounds", rows, out["emulated"])
    console.print(f"efficiency {out['efficiency']:.3f} (min {out['efficiency_min']:.3f}, max "
                  f"{out['efficiency_max']:.3f}) of the sum of standalone; "
                  f"{out['speedup_vs_even']:.2f}x the even split"
                  f"{emulated_tag(out['emulated'])}; {time.perf_counter() - t0:.0f} s",
                  highlight=False)
    write_json(json_path, out)


@bench_app.command("pp")
@user_errors
def pp(
    cluster: Path = typer.Option(..., help="cluster YAML"),
    model: str = typer.Option("small"),
    micro_batches: int = typer.Option(8, min=1),
    micro_batch_size: int = typer.Option(2, min=1),
    seq_len: int = typer.Option(64, min=2),
    steps: int = typer.Option(4, min=2),
    time_scale: float | None = typer.Option(None, help="emulation stretch; default calibrated"),
    rounds: int = typer.Option(3, min=1, help="rounds of interleaved runs (median, min, max)"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """A mixed-kind pipeline: even layer split against layers split by kind speed, the
    zero-bubble schedule against 1F1B on the balanced split, and two sequence pieces against
    whole sequences under zero-bubble."""
    check_writable_file(json_path, "--json")
    console = Console()
    out = bench_pp(load_cluster(cluster), model, micro_batches, micro_batch_size, seq_len,
                   steps, time_scale, rounds)
    _print(console, f"bench pp, {rounds} rounds",
           {f"even layers {out['even_layers']}": _row(out, "even_tokens_per_s"),
            f"balanced layers {out['balanced_layers']}": _row(out, "balanced_tokens_per_s"),
            "balanced, zero-bubble": _row(out, "zero_bubble_tokens_per_s"),
            "balanced, zero-bubble, 2 sequence pieces": _row(out, "pieces_tokens_per_s")},
           out["emulated"])
    console.print(f"balanced split: {out['speedup']:.2f}x the even split (min "
                  f"{out['speedup_min']:.2f}, max {out['speedup_max']:.2f}); zero-bubble "
                  f"{out['zero_bubble_speedup']:.2f}x 1F1B (min "
                  f"{out['zero_bubble_speedup_min']:.2f}, max "
                  f"{out['zero_bubble_speedup_max']:.2f}; simulated "
                  f"{out['zero_bubble_speedup_simulated']:.2f}x); 2 sequence pieces "
                  f"{out['pieces_speedup']:.2f}x whole sequences (min "
                  f"{out['pieces_speedup_min']:.2f}, max {out['pieces_speedup_max']:.2f}; "
                  f"simulated {out['pieces_speedup_simulated']:.2f}x)"
                  f"{emulated_tag(out['emulated'])}", highlight=False)
    write_json(json_path, out)

"""`hetrain bench dp|pp|sim`: measured figures written as JSON. Every run of a bench shares one
emulation time scale, so the runs compare."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import bench_app, user_errors
from hetrain.cli.report import emulated_tag, write_json
from hetrain.cluster.loading import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus, load_corpus
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan.io import check_writable_file
from hetrain.plan.types import Plan, Route, StageGroup
from hetrain.planner.balance import balanced_layer_split, even_layer_split
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import calibrate_time_scale, train
from hetrain.runtime.results import RunResult


def _measure(cluster: Cluster, plan: Plan, config: TrainConfig, scale: float,
             corpus: Corpus) -> RunResult:
    return train(cluster, plan, config, corpus=corpus, time_scale=scale)


def _print(console: Console, title: str, rows: dict[str, float], emulated: bool) -> None:
    table = Table(title=title + emulated_tag(emulated))
    table.add_column("run")
    table.add_column("tokens/s" + emulated_tag(emulated), justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value:,.0f}")
    console.print(table)


def bench_dp(cluster: Cluster, model: str, global_batch: int, seq_len: int, steps: int,
             time_scale: float | None = None) -> dict:
    """Each kind alone, all kinds with an even split (plain DDP), all with hetrain's split."""
    spec = model_spec(model_config(model), seq_len)
    cost = CostModel(cluster, spec)
    config = TrainConfig(model=model, steps=steps)
    hetero = data_parallel_plan(cluster, cost, global_batch)
    corpus = load_corpus(config.data, config.seed)  # read once for every run of the bench
    scale = time_scale or calibrate_time_scale(hetero, cost, corpus, config, None)
    standalone = {}
    emulated = False
    for kind in cluster.kind_counts():
        alone = _measure(cluster, data_parallel_plan(cluster, cost, global_batch, kinds=[kind]),
                         config, scale, corpus)
        standalone[kind] = alone.tokens_per_s
        emulated |= alone.is_emulated
    even = _measure(cluster, data_parallel_plan(cluster, cost, global_batch, even=True),
                    config, scale, corpus)
    ours = _measure(cluster, hetero, config, scale, corpus)
    return {
        "standalone_tokens_per_s": standalone,
        "even_tokens_per_s": even.tokens_per_s,
        "hetrain_tokens_per_s": ours.tokens_per_s,
        "efficiency": ours.tokens_per_s / sum(standalone.values()),
        "speedup_vs_even": ours.tokens_per_s / even.tokens_per_s,
        "shares": {g.devices[0]: hetero.samples_of(g.name) for g in hetero.stage_groups},
        "hetrain_final_loss": ours.final_loss,
        "emulated": emulated or ours.is_emulated,
        "time_scale": scale, "model": model, "global_batch": global_batch,
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
             seq_len: int, steps: int, time_scale: float | None = None) -> dict:
    """One pipeline over one device of each kind (fastest first): even layer split against
    the split balanced by kind speed."""
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
    scale = time_scale or calibrate_time_scale(balanced, cost, corpus, config, None)
    r_even = _measure(cluster, even, config, scale, corpus)
    r_bal = _measure(cluster, balanced, config, scale, corpus)
    return {
        "kinds": kinds,
        "even_layers": even_layers, "balanced_layers": balanced_layers,
        "even_tokens_per_s": r_even.tokens_per_s,
        "balanced_tokens_per_s": r_bal.tokens_per_s,
        "speedup": r_bal.tokens_per_s / r_even.tokens_per_s,
        "emulated": r_even.is_emulated or r_bal.is_emulated,
        "time_scale": scale, "model": model, "micro_batches": micro_batches,
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
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """Data parallelism: each kind alone, an even split, and hetrain's speed-aware split."""
    check_writable_file(json_path, "--json")
    console = Console()
    t0 = time.perf_counter()
    out = bench_dp(load_cluster(cluster), model, global_batch, seq_len, steps, time_scale)
    rows = {f"{k} alone": v for k, v in out["standalone_tokens_per_s"].items()}
    rows |= {"all kinds, even split (DDP)": out["even_tokens_per_s"],
             "all kinds, hetrain split": out["hetrain_tokens_per_s"]}
    _print(console, "bench dp", rows, out["emulated"])
    console.print(f"efficiency {out['efficiency']:.3f} of the sum of standalone; "
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
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """A mixed-kind pipeline: even layer split against layers split by kind speed."""
    check_writable_file(json_path, "--json")
    console = Console()
    out = bench_pp(load_cluster(cluster), model, micro_batches, micro_batch_size, seq_len,
                   steps, time_scale)
    _print(console, "bench pp", {f"even layers {out['even_layers']}": out["even_tokens_per_s"],
                                 f"balanced layers {out['balanced_layers']}":
                                     out["balanced_tokens_per_s"]}, out["emulated"])
    console.print(f"balanced split: {out['speedup']:.2f}x the even split"
                  f"{emulated_tag(out['emulated'])}", highlight=False)
    write_json(json_path, out)

"""`hetrain bench tax`: hetrain's overhead on one real kind. Two real CPU workers train the same
model, global batch, samples and optimizer under hetrain and under plain
`DistributedDataParallel`, in interleaved rounds; tax = hetrain's step over DDP's, minus 1."""

from __future__ import annotations

import statistics
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import bench_app, user_errors
from hetrain.cli.report import write_json
from hetrain.cluster.loading import cluster_from_dict
from hetrain.data.loading import load_corpus
from hetrain.errors import PlanError
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan.expand import expand_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.ddp_baseline import ddp_run, steady_median_s
from hetrain.runtime.launch import train


def bench_tax(model: str, global_batch: int, seq_len: int, steps: int, rounds: int,
              workers: int = 2) -> dict:
    if global_batch % workers:
        raise PlanError(f"--global-batch {global_batch} must split evenly over {workers} "
                        "workers, as DDP needs")
    cluster = cluster_from_dict({"name": "real-cpus", "kinds": {"cpu": {"mode": "real"}},
                                 "nodes": [{"name": "host", "kind": "cpu", "count": workers}]})
    share = global_batch // workers
    # One micro-batch per worker, as DDP takes its local batch in one pass.
    plan = expand_plan({"model": model, "seq_len": seq_len, "micro_batch_size": share,
                        "n_layers": model_spec(model_config(model), seq_len).n_layers,
                        "data_parallel": [{"kind": "cpu", "samples": share}] * workers},
                       cluster)
    config = TrainConfig(model=model, steps=steps, op_timeout_s=120, run_timeout_s=900)
    corpus = load_corpus(config.data, config.seed)
    hetrain_s, ddp_s, taxes = [], [], []
    losses: dict[str, list[float]] = {}
    for r in range(rounds):
        # Alternate which runs first, so a drift of the host's load favours neither.
        order = ("hetrain", "ddp") if r % 2 == 0 else ("ddp", "hetrain")
        step = {}
        for name in order:
            if name == "hetrain":
                result = train(cluster, plan, config, corpus=corpus, time_scale=1.0)
                if result.is_emulated:
                    raise PlanError("bench tax needs its cpu workers real, not emulated")
                step[name], losses[name] = steady_median_s(result.step_s), result.losses
            else:
                ddp_step_s, losses[name] = ddp_run(config, corpus, global_batch, seq_len,
                                                   workers)
                step[name] = steady_median_s(ddp_step_s)
        hetrain_s.append(step["hetrain"])
        ddp_s.append(step["ddp"])
        taxes.append(100.0 * (step["hetrain"] / step["ddp"] - 1.0))
    return {
        "tax_pct": 100.0 * (statistics.median(hetrain_s) / statistics.median(ddp_s) - 1.0),
        "tax_pct_per_round": taxes,
        "tax_pct_min": min(taxes), "tax_pct_max": max(taxes),
        "hetrain_step_s": _stats(hetrain_s), "ddp_step_s": _stats(ddp_s),
        "final_loss": {k: v[-1] for k, v in losses.items()},
        "mode": "real", "emulated": False, "kind": "cpu", "workers": workers,
        "model": model, "global_batch": global_batch, "seq_len": seq_len, "steps": steps,
        "rounds": rounds, "optimizer": "AdamW (foreach=False)", "precision": config.precision,
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": values}


@bench_app.command("tax")
@user_errors
def tax(
    model: str = typer.Option("tiny"),
    global_batch: int = typer.Option(32, min=2),
    seq_len: int = typer.Option(64, min=2),
    steps: int = typer.Option(8, min=2, help="steps per run; the first is left out"),
    rounds: int = typer.Option(3, min=1, help="interleaved rounds of hetrain and DDP"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """hetrain against plain DistributedDataParallel on two real CPU workers."""
    out = bench_tax(model, global_batch, seq_len, steps, rounds)
    table = Table(title="bench tax: two real CPU workers (real, not emulated)")
    for col in ("run", "median step ms", "min", "max", "final loss"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, key in (("hetrain", "hetrain_step_s"), ("DDP", "ddp_step_s")):
        s = out[key]
        table.add_row(name, f"{1e3 * s['median']:.1f}", f"{1e3 * s['min']:.1f}",
                      f"{1e3 * s['max']:.1f}", f"{out['final_loss'][name.lower()]:.4f}")
    console = Console()
    console.print(table)
    console.print(f"tax {out['tax_pct']:+.1f} % (rounds {out['tax_pct_min']:+.1f} .. "
                  f"{out['tax_pct_max']:+.1f} %)", highlight=False)
    write_json(json_path, out)

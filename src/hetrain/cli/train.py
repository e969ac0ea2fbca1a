"""`hetrain train`: run a plan (given, or speed-proportional data parallelism) for N steps."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from hetrain.cli.main import app, user_errors
from hetrain.cli.report import per_group_table, per_kind_table, train_progress, write_json
from hetrain.cluster.loading import load_cluster
from hetrain.cost.model import CostModel
from hetrain.errors import PlanError
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan import load_plan
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.planner.replan import data_parallel_replan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.emulation import emulated_kinds
from hetrain.runtime.launch import check_plan, plan_spec, torchrun_main
from hetrain.runtime.launch import train as run_train
from hetrain.runtime.recovery import train_resilient
from hetrain.trace import TraceEvent, write_chrome_trace


@app.command()
@user_errors
def train(
    cluster: Path = typer.Option(..., help="cluster YAML"),
    plan: Path | None = typer.Option(None, help="plan JSON/YAML; default: data parallelism "
                                     "with speed-proportional shares"),
    model: str = typer.Option("tiny", help="model name (tiny, small, ...)"),
    steps: int = typer.Option(20, min=1),
    global_batch: int = typer.Option(48, min=1, help="samples per step (without --plan)"),
    seq_len: int = typer.Option(64, min=2, help="tokens per sample (without --plan)"),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    data: str | None = typer.Option(None, help="text file or folder; default: Python stdlib"),
    time_scale: float | None = typer.Option(None, help="emulation stretch; default calibrated"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
    trace: Path | None = typer.Option(None, help="write a Chrome trace of the measured steps"),
    checkpoint_dir: str | None = typer.Option(None, help="folder for checkpoints"),
    checkpoint_every: int = typer.Option(0, min=0, help="checkpoint every N steps"),
    resume: bool = typer.Option(False, help="continue from the latest good checkpoint"),
    out_dir: Path | None = typer.Option(None, help="keep the workers' reports here"),
) -> None:
    """Train a model on the cluster's devices, emulating kinds that are not present."""
    c = load_cluster(cluster)
    config = TrainConfig(model=model, steps=steps, seed=seed, lr=lr, data=data,
                         time_scale=time_scale, trace=trace is not None,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         resume=resume)
    if plan is not None:
        p = load_plan(plan, c)
        config = config.model_copy(update={"model": p.model})
    else:
        spec = model_spec(model_config(model), seq_len)
        p = data_parallel_plan(c, CostModel(c, spec), global_batch)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torchrun_main(c, p, config, str(out_dir or "out/torchrun"))
        return
    # Refuse a bad plan before any output: one line, exit 2.
    check_plan(p, c, plan_spec(p, None))
    console = Console()
    emulated_set = emulated_kinds(p, c)  # a `mode: real` kind that cannot run stops here
    emulated = bool(emulated_set)
    if emulated:
        real = sorted(set(p.kinds()) - emulated_set)
        console.print(f"[yellow]emulated:[/] {', '.join(sorted(emulated_set))} run as CPU "
                      "processes paced to their catalog speed"
                      + (f"; [green]real:[/] {', '.join(real)}" if real else ""),
                      highlight=False)
    bar = train_progress(console, steps, emulated)
    with bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), tps=0.0)
        tokens = p.global_batch * p.seq_len

        def on_step(rec: dict) -> None:
            bar.update(task, completed=rec["step"] + 1, loss=rec["loss"],
                       tps=tokens / rec["step_s"])

        if checkpoint_dir:
            # With checkpoints on, a lost or hung worker is survived: re-plan, resume.
            resilient = train_resilient(c, p, config, replan=data_parallel_replan(),
                                        out_dir=out_dir, progress=on_step)
            result = resilient.result
            for rec in resilient.recoveries:
                console.print(f"[yellow]recovered:[/] {rec.summary()}", highlight=False)
        else:
            result = run_train(c, p, config, out_dir=out_dir, progress=on_step)
    console.print(per_kind_table(result))
    console.print(per_group_table(result))
    tag = " (emulated)" if result.is_emulated else ""
    console.print(f"loss {result.losses[0]:.4f} -> {result.final_loss:.4f}; "
                  f"{result.tokens_per_s:,.0f} tokens/s{tag}", highlight=False)
    write_json(json_path, result.summary())
    if trace is not None:
        if not result.events:
            raise PlanError("no trace events were recorded")
        t0 = min(e["start_s"] for e in result.events)
        events = [TraceEvent(**{**e, "start_s": e["start_s"] - t0}) for e in result.events]
        write_chrome_trace(events, trace, {"emulated": result.is_emulated, "source": "runtime"})

"""`hetrain train`: run a plan (given, or speed-proportional data parallelism) for N steps."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from hetrain.cli.main import app, user_errors
from hetrain.cli.report import per_group_table, per_kind_table, train_progress, write_json
from hetrain.cluster.loading import load_cluster
from hetrain.cost.model import CostModel
from hetrain.errors import ConfigError, ModelError, PlanError
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan import load_plan
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.planner.replan import data_parallel_replan
from hetrain.runtime.emulation import emulated_kinds
from hetrain.runtime.failure import Suspect
from hetrain.runtime.launch import check_plan, plan_spec, torchrun_main
from hetrain.runtime.launch import train as run_train
from hetrain.runtime.preflight import check_batch, check_writable_file, preflight, train_config
from hetrain.runtime.recovery import train_resilient
from hetrain.runtime.runlock import RunComplete, run_folder
from hetrain.trace import TraceEvent, write_chrome_trace


@app.command()
@user_errors
def train(
    ctx: typer.Context,
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
    resume: bool = typer.Option(True, help="continue the checkpoint folder's run (the "
                                "default); --no-resume refuses a folder holding checkpoints"),
    fresh: bool = typer.Option(False, help="start over in a checkpoint folder holding a run: "
                               "its checkpoints are moved aside"),
    hang_timeout: float | None = typer.Option(None, min=0.1, help="seconds without a heartbeat "
                                              "before a worker is lost; default: a few steps, "
                                              ">= 20"),
    out_dir: Path | None = typer.Option(None, help="keep the workers' reports here"),
    precision: str = typer.Option("float32", help="float32, float64, or bf16 / fp16: mixed "
                                  "precision per kind (fp16 + loss scaling without bf16)"),
) -> None:
    """Train a model on the cluster's devices, emulating kinds that are not present."""
    # Every input is checked before any output, any file written or any worker started.
    source = ctx.get_parameter_source("resume")  # typer's own click: compare by name
    if not checkpoint_dir and getattr(source, "name", "") == "COMMANDLINE":
        raise ConfigError("--resume needs --checkpoint-dir: give the folder")
    config = train_config(cli=True, model=model, steps=steps, seed=seed, lr=lr, data=data,
                          time_scale=time_scale, trace=trace is not None,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                          resume=resume, fresh=fresh, hang_timeout_s=hang_timeout,
                          precision=precision)
    outputs = [(json_path, "--json"), (trace, "--trace")]
    for path, option in outputs:
        check_writable_file(path, option)
    c = load_cluster(cluster)
    if plan is not None:
        p = load_plan(plan, c)
        config = config.model_copy(update={"model": p.model})
    else:
        check_batch(global_batch, seq_len, cli=True)
        cfg = model_config(model)
        if seq_len > cfg.max_seq_len:
            raise ModelError(f"--seq-len {seq_len} is longer than {cfg.name}'s max_seq_len "
                             f"{cfg.max_seq_len}; pass at most that")
        spec = model_spec(cfg, seq_len)
        p = data_parallel_plan(c, CostModel(c, spec), global_batch)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    corpus = preflight(c, p, config, out_dir=out_dir, outputs=outputs, cli=True,
                       spawn=not under_torchrun)
    check_plan(p, c, plan_spec(p, None))
    if under_torchrun:
        torchrun_main(c, p, config, str(out_dir or "out/torchrun"))
        return
    # Own the checkpoint folder before any output (taken: one line, exit 2); the command's
    # click context releases it when the command ends.
    try:
        config = ctx.with_resource(run_folder(config, p))
    except RunComplete as done:
        Console().print(str(done), highlight=False, soft_wrap=True)
        return
    console = Console()
    emulated_set = emulated_kinds(p, c)  # a `mode: real` kind that cannot run stops here
    emulated = bool(emulated_set)
    if emulated:
        real = sorted(set(p.kinds()) - emulated_set)
        # Kind names come from the user's YAML: escaped, never read as markup.
        console.print(f"[yellow]emulated:[/] {escape(', '.join(sorted(emulated_set)))} run as "
                      "CPU processes paced to their catalog speed"
                      + (f"; [green]real:[/] {escape(', '.join(real))}" if real else ""),
                      highlight=False)
    bar = train_progress(console, steps, emulated)
    with bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), tps=0.0, note="")
        tokens = p.global_batch * p.seq_len

        def on_suspect(rec: Suspect) -> None:  # the bar names the worker the others wait on
            bar.update(task, note=rec.describe())

        def on_step(rec: dict) -> None:
            bar.update(task, completed=rec["step"] + 1, loss=rec["loss"],
                       tps=tokens / rec["step_s"], note="")

        try:
            if checkpoint_dir:
                # With checkpoints on, a lost or hung worker is survived: re-plan, resume.
                resilient = train_resilient(c, p, config, replan=data_parallel_replan(),
                                            corpus=corpus, out_dir=out_dir, progress=on_step,
                                            on_suspect=on_suspect)
                result, summary = resilient.result, resilient.summary()
                for rec in resilient.recoveries:
                    # Plain text: gloo's messages hold paths like `[/tmp/...]`, not markup.
                    console.print(Text.assemble(("recovered:", "yellow"), " ",
                                                str(rec.summary())), highlight=False)
            else:
                result = run_train(c, p, config, corpus=corpus, out_dir=out_dir,
                                   progress=on_step, on_suspect=on_suspect)
                summary = result.summary()
        except RunComplete as done:
            bar.stop()
            console.print(str(done), highlight=False, soft_wrap=True)
            return
    console.print(per_kind_table(result))
    console.print(per_group_table(result))
    tag = " (emulated)" if result.is_emulated else ""
    console.print(f"loss {result.losses[0]:.4f} -> {result.final_loss:.4f}; "
                  f"{result.tokens_per_s:,.0f} tokens/s{tag}", highlight=False)
    write_json(json_path, summary)
    if trace is not None:
        if not result.events:
            raise PlanError("no trace events were recorded")
        t0 = min(e["start_s"] for e in result.events)
        events = [TraceEvent(**{**e, "start_s": e["start_s"] - t0}) for e in result.events]
        write_chrome_trace(events, trace, {"emulated": result.is_emulated, "source": "runtime"})

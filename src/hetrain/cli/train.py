"""`hetrain train`: a job (file and flags) planned, trained and shown; the work is done by
hetrain.training and the runtime's entry point, this module only parses and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.text import Text

from hetrain.cli.main import app, user_errors
from hetrain.cli.plan import print_plan_table
from hetrain.cli.report import per_group_table, per_kind_table, train_progress, write_json
from hetrain.cluster.topology import Cluster
from hetrain.errors import ConfigError, PlanError
from hetrain.plan.types import Plan
from hetrain.runtime.emulation import emulated_kinds
from hetrain.runtime.entry import RunHooks
from hetrain.runtime.failure import Suspect
from hetrain.runtime.job_config import JobConfig, load_job
from hetrain.runtime.records import StepRecord
from hetrain.runtime.results import RunResult
from hetrain.runtime.runlock import RunComplete
from hetrain.trace import TraceEvent, write_chrome_trace
from hetrain.training import PlannedJob, plan_job, run_job

# Each flag's place in the job file, and its name in messages.
FLAGS = {
    "cluster": ("cluster.path", "--cluster"), "plan": ("plan.path", "--plan"),
    "model": ("model.name", "--model"), "steps": ("schedule.steps", "--steps"),
    "global_batch": ("plan.global_batch", "--global-batch"),
    "seq_len": ("plan.seq_len", "--seq-len"), "search": ("plan.search", "--search"),
    "lr": ("optimizer.lr", "--lr"), "seed": ("schedule.seed", "--seed"),
    "data": ("data.path", "--data"), "time_scale": ("cluster.time_scale", "--time-scale"),
    "json_path": ("logging.json_file", "--json"), "trace": ("logging.trace_file", "--trace"),
    "checkpoint_dir": ("checkpoint.dir", "--checkpoint-dir"),
    "checkpoint_every": ("checkpoint.every", "--checkpoint-every"),
    "resume": ("checkpoint.resume", "--resume"), "fresh": ("checkpoint.fresh", "--fresh"),
    "hang_timeout": ("cluster.hang_timeout_s", "--hang-timeout"),
    "out_dir": ("logging.out_dir", "--out-dir"),
    "precision": ("schedule.precision", "--precision"),
    "warmup_steps": ("optimizer.warmup_steps", "--warmup-steps"),
    "lr_schedule": ("optimizer.lr_schedule", "--lr-schedule"),
    "min_lr": ("optimizer.min_lr", "--min-lr"), "grad_clip": ("optimizer.grad_clip", "--grad-clip"),
    "weight_decay": ("optimizer.weight_decay", "--weight-decay"),
}


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help="job file (TOML or YAML, in sections: "
                                       "model, data, cluster, plan, optimizer, schedule, "
                                       "checkpoint, logging); flags override it"),
    cluster: Path | None = typer.Option(None, help="cluster YAML"),
    plan: Path | None = typer.Option(None, help="plan JSON/YAML; default: the planner's"),
    model: str = typer.Option("tiny", help="the model: a built-in name (tiny, small, ...), a "
                              "Hugging Face config.json or model folder, or a model YAML"),
    steps: int = typer.Option(20, min=1),
    global_batch: int = typer.Option(48, min=1, help="samples per step (without --plan)"),
    seq_len: int = typer.Option(64, min=2, help="tokens per sample (without --plan)"),
    search: bool = typer.Option(True, help="without --plan: search the fastest plan; "
                                "--no-search: data parallelism with speed-proportional shares"),
    lr: float = typer.Option(1e-3),
    warmup_steps: int = typer.Option(0, min=0, help="linear learning-rate warm-up steps"),
    lr_schedule: str = typer.Option("constant", help="after warm-up: constant or cosine "
                                    "(decay to --min-lr at the last step)"),
    min_lr: float = typer.Option(0.0, help="floor of the cosine schedule"),
    grad_clip: float | None = typer.Option(None, help="clip the global gradient norm to this"),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay (not on norms, biases)"),
    seed: int = typer.Option(0),
    data: str | None = typer.Option(None, help="text file or folder, or a token file "
                                    "(.bin, see `hetrain data prepare`) or folder of them; "
                                    "default: Python stdlib"),
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
    out_dir: Path | None = typer.Option(None, help="keep the workers' reports (and the plan) "
                                        "here"),
    precision: str = typer.Option("float32", help="float32, float64, or bf16 / fp16: mixed "
                                  "precision per kind (fp16 + loss scaling without bf16)"),
) -> None:
    """Train a model on the cluster's devices, emulating kinds that are not present."""
    # Every input is checked before any output, any file written or any worker started.
    job = _job(ctx, config, locals())
    if _given(ctx, "resume") and not job.checkpoint.dir:
        raise ConfigError("--resume needs --checkpoint-dir: give the folder")
    planned = plan_job(job, cli=True)
    console = Console()
    bars: list[Progress] = []  # started once every check passed
    tokens = planned.plan.global_batch * planned.plan.seq_len

    def on_start() -> None:  # every check passed and the folder is ours: say what runs
        _print_plan(console, planned)
        emulated = _print_emulated(console, planned.plan, planned.cluster)
        bars.append(train_progress(console, job.schedule.steps, emulated))
        bars[0].add_task("train", total=job.schedule.steps, loss=float("nan"), tps=0.0,
                         note="")
        bars[0].start()

    def on_suspect(rec: Suspect) -> None:  # the bar names the worker the others wait on
        bars[0].update(bars[0].task_ids[0], note=rec.describe())

    def on_step(rec: StepRecord) -> None:
        bars[0].update(bars[0].task_ids[0], completed=rec.step + 1, loss=rec.loss,
                       tps=tokens / rec.step_s, note="")

    try:
        # With checkpoints on, a lost or hung worker is survived: re-plan, resume.
        result = run_job(planned, hooks=RunHooks(on_start, on_step, on_suspect), cli=True)
    except RunComplete as done:
        for bar in bars:
            bar.stop()
        console.print(str(done), highlight=False, soft_wrap=True)
        return
    finally:
        for bar in bars:
            bar.stop()
    if result is not None:  # None: a torchrun rank, the job's figures are not gathered here
        _print_result(console, result, job)


def _job(ctx: typer.Context, path: Path | None, values: dict[str, Any]) -> JobConfig:
    """The job file (or the defaults) with the flags given on the command line over it."""
    job = load_job(path) if path is not None else JobConfig()
    given = {name: values[name] for name in FLAGS if _given(ctx, name)}
    overrides = {FLAGS[name][0]: str(v) if isinstance(v, Path) else v
                 for name, v in given.items()}
    return job.with_values(overrides, {key: flag for key, flag in FLAGS.values()})


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the flag was on the command line (typer's own click: compare by name)."""
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


def _print_plan(console: Console, planned: PlannedJob) -> None:
    how = {"file": f"plan {planned.job.plan.path}", "search": "the planner's plan",
           "data_parallel": "data parallelism, shares by speed"}[planned.source]
    if planned.note:
        console.print(Text(planned.note, style="yellow"), highlight=False)
    print_plan_table(console, planned.plan, planned.cost_model(), planned.estimate,
                     title=f"{how}: {planned.plan.model}, global batch "
                     f"{planned.plan.global_batch} x {planned.plan.seq_len} tokens")
    if planned.plan_path is not None:
        console.print(f"plan saved to {planned.plan_path}", highlight=False)


def _print_result(console: Console, result: RunResult, job: JobConfig) -> None:
    for rec in result.recoveries:
        # Plain text: gloo's messages hold paths like `[/tmp/...]`, not markup.
        console.print(Text.assemble(("recovered:", "yellow"), " ", str(rec.summary())),
                      highlight=False)
    console.print(per_kind_table(result))
    console.print(per_group_table(result))
    tag = " (emulated)" if result.is_emulated else ""
    console.print(f"loss {result.losses[0]:.4f} -> {result.final_loss:.4f}; "
                  f"{result.tokens_per_s:,.0f} tokens/s{tag}", highlight=False)
    write_json(job.logging.json_file, result.summary())
    trace = job.logging.trace_file
    if trace is not None:
        if not result.events:
            raise PlanError("no trace events were recorded")
        t0 = min(e["start_s"] for e in result.events)
        events = [TraceEvent(**{**e, "start_s": e["start_s"] - t0}) for e in result.events]
        write_chrome_trace(events, Path(trace), {"emulated": result.is_emulated,
                                                 "source": "runtime"})


def _print_emulated(console: Console, plan: Plan, cluster: Cluster) -> bool:
    """One line naming the kinds emulated here, if any (a `mode: real` kind that cannot run
    stops here); whether any is."""
    emulated_set = emulated_kinds(plan, cluster)
    if emulated_set:
        real = sorted(set(plan.kinds()) - emulated_set)
        # Kind names come from the user's YAML: escaped, never read as markup.
        console.print(f"[yellow]emulated:[/] {escape(', '.join(sorted(emulated_set)))} run as "
                      "CPU processes paced to their catalog speed"
                      + (f"; [green]real:[/] {escape(', '.join(real))}" if real else ""),
                      highlight=False)
    return bool(emulated_set)

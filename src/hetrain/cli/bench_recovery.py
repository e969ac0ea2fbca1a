"""`hetrain bench recovery`: kill a worker mid-run; measure the time from the failure to the
first step after hetrain re-planned on the survivors and resumed, and the steps redone."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console

from hetrain.cli.main import bench_app, user_errors
from hetrain.cli.report import emulated_tag, write_json
from hetrain.cluster.loading import load_cluster
from hetrain.cost.model import CostModel
from hetrain.data.loading import load_corpus
from hetrain.errors import ConfigError
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.plan.io import check_writable_file
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.planner.replan import data_parallel_replan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.emulation import emulated_kinds
from hetrain.runtime.entry import train_resilient
from hetrain.runtime.faults import Faults
from hetrain.runtime.launch import calibrate_time_scale
from hetrain.runtime.reference import train_reference


def bench_recovery(cluster_path: Path, model: str, global_batch: int, seq_len: int, steps: int,
                   fail_at_step: int, fail_rank: int, checkpoint_every: int,
                   time_scale: float | None, checkpoint_dir: str) -> dict:
    cluster = load_cluster(cluster_path)
    cost = CostModel(cluster, model_spec(model_config(model), seq_len))
    plan = data_parallel_plan(cluster, cost, global_batch)
    if not 0 <= fail_rank < len(plan.devices()):
        raise ConfigError(f"--fail-rank {fail_rank}: the plan has ranks 0.."
                          f"{len(plan.devices()) - 1}")
    config = TrainConfig(model=model, steps=steps, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, op_timeout_s=60, run_timeout_s=600,
                         fresh=True)
    corpus = load_corpus(None, config.seed)
    emulated = bool(emulated_kinds(plan, cluster))
    scale = time_scale or (calibrate_time_scale(plan, cost, corpus, config)
                           if emulated else 1.0)
    t0 = time.perf_counter()
    out = train_resilient(cluster, plan, config, replan=data_parallel_replan(),
                          corpus=corpus, time_scale=scale,
                          faults=Faults(step=fail_at_step, rank=fail_rank))
    wall_s = time.perf_counter() - t0
    if not out.recoveries:
        raise ConfigError("the injected failure did not happen; use --fail-at-step < --steps")
    rec = out.recoveries[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: many threads on a busy host crawl
    try:
        ref, _ = train_reference(config, corpus, global_batch, seq_len)
    finally:
        torch.set_num_threads(threads)
    diff = max((out.params[k] - v).abs().max().item() for k, v in ref.items()
               if k in out.params)
    return {
        "recovery_s": rec.recovery_s, "steps_redone": rec.steps_redone,
        "detect_s": rec.detect_s,
        "restart_s": rec.first_step_at - rec.detected_at,
        "step_s_after": statistics.median(out.step_s),
        "failed_device": plan.devices()[fail_rank], "lost_devices": rec.lost_devices,
        "failed_at_step": rec.steps_done, "resumed_from_step": rec.resumed_step,
        "kinds_before": plan.kinds(), "kinds_after": out.plan.kinds(),
        "shares_before": {g.devices[0]: plan.samples_of(g.name) for g in plan.stage_groups},
        "shares_after": {g.devices[0]: out.plan.samples_of(g.name)
                         for g in out.plan.stage_groups},
        "final_loss": out.losses[-1], "max_abs_diff_vs_one_process": diff,
        "wall_s": wall_s, "emulated": emulated or out.is_emulated, "time_scale": scale,
        "model": model, "global_batch": global_batch, "seq_len": seq_len, "steps": steps,
        "checkpoint_every": checkpoint_every, "precision": config.precision,
    }


@bench_app.command("recovery")
@user_errors
def recovery(
    cluster: Path = typer.Option(Path("examples/clusters/three-kinds.yaml"), help="cluster YAML"),
    model: str = typer.Option("tiny"),
    global_batch: int = typer.Option(24, min=1),
    seq_len: int = typer.Option(64, min=2),
    steps: int = typer.Option(12, min=2),
    fail_at_step: int = typer.Option(7, min=1, help="the worker dies as this step starts"),
    fail_rank: int = typer.Option(1, min=0, help="which worker dies (rank in the plan)"),
    checkpoint_every: int = typer.Option(3, min=1),
    checkpoint_dir: Path | None = typer.Option(None, help="default: a temporary folder"),
    time_scale: float | None = typer.Option(None, help="emulation stretch; default calibrated"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """Kill one worker of a speed-proportional data-parallel run and let hetrain re-plan on
    the survivors and resume from the last checkpoint."""
    check_writable_file(json_path, "--json")
    with tempfile.TemporaryDirectory(prefix="hetrain-bench-ckpt-") as scratch:
        out = bench_recovery(cluster, model, global_batch, seq_len, steps, fail_at_step,
                             fail_rank, checkpoint_every, time_scale,
                             str(checkpoint_dir or scratch))
    tag = emulated_tag(out["emulated"])
    Console().print(
        f"lost {', '.join(out['lost_devices'])} at step {out['failed_at_step']}; resumed on "
        f"{', '.join(out['kinds_after'])} from step {out['resumed_from_step']}{tag}\n"
        f"recovery {out['recovery_s']:.2f} s (detection {out['detect_s']:.2f} s, restart + "
        f"first step {out['restart_s']:.2f} s), {out['steps_redone']} step(s) redone; "
        f"final parameters within {out['max_abs_diff_vs_one_process']:.1e} of one-process "
        "training", highlight=False)
    write_json(json_path, out)

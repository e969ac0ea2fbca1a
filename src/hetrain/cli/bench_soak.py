"""`hetrain bench soak`: a long emulated run with checkpoints on, watched for leaks: resident
memory and open descriptors of the launcher and its workers, and tokens/s, over the run."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.console import Console

from hetrain.cli.main import bench_app, user_errors
from hetrain.cli.report import emulated_tag, write_json
from hetrain.cluster.loading import load_cluster
from hetrain.cost.model import CostModel
from hetrain.data.loading import load_corpus
from hetrain.model.loading import load_model
from hetrain.plan.io import check_writable_file
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.launch import calibrate_time_scale, train
from hetrain.runtime.records import StepRecord

# The targets of issue 12: no leak shows over a long run.
RSS_GROWTH_MAX_PCT = 5.0
TOKENS_PER_S_CHANGE_MAX_PCT = 5.0
PACE = 3.0  # emulated steps this many times the calibrated pace: the CPU is not the limit


@dataclass
class Sample:
    """The processes' resources after `step` steps (the launcher and each worker)."""

    step: int
    elapsed_s: float
    launcher_rss_bytes: int
    worker_rss_bytes: list[int]
    launcher_fds: int
    worker_fds: list[int]


def live_children(pid: int) -> list[int]:
    """Live child processes of `pid` that are workers (not multiprocessing's helpers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z" and b"resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(step: int, t0: float) -> Sample:
    me, workers = os.getpid(), live_children(os.getpid())
    rss, fds = [], []
    for pid in workers:
        try:
            rss.append(rss_bytes(pid))
            fds.append(open_fds(pid))
        except OSError:  # a worker exiting as we read it
            continue
    return Sample(step, time.monotonic() - t0, rss_bytes(me), rss, open_fds(me), fds)


def growth_pct(before: float, after: float) -> float:
    return 100.0 * (after - before) / before if before else 0.0


def window_tokens_per_s(step_s: list[float], first: int, last: int, tokens: int) -> float:
    """Throughput over steps [first, last): tokens over the median step time (the machine's
    other load comes and goes; a leak slows every step, the median sees it)."""
    return tokens / statistics.median(step_s[first:last])


def soak_figures(samples: list[Sample], step_s: list[float], tokens: int,
                 baseline: int) -> dict:
    """Growth from the baseline sample (after `baseline` steps: caches warm, first
    checkpoints written) to the end, and tokens/s of the last window vs the one after the
    baseline, each window `baseline` steps long (100 of 1,000)."""
    base = next(s for s in samples if s.step >= baseline)
    end = samples[-1]
    n = len(step_s)
    early = window_tokens_per_s(step_s, baseline, 2 * baseline, tokens)
    late = window_tokens_per_s(step_s, n - baseline, n, tokens)
    rss = {"launcher": growth_pct(base.launcher_rss_bytes, end.launcher_rss_bytes),
           "workers": growth_pct(sum(base.worker_rss_bytes), sum(end.worker_rss_bytes)),
           "worst_worker": max((growth_pct(a, b) for a, b in zip(
               base.worker_rss_bytes, end.worker_rss_bytes, strict=False)), default=0.0)}
    fds = {"launcher": end.launcher_fds - base.launcher_fds,
           "workers": sum(end.worker_fds) - sum(base.worker_fds)}
    change = growth_pct(early, late)
    return {
        "baseline_step": baseline, "window_steps": baseline,
        "rss_growth_pct": rss, "fd_growth": fds,
        "tokens_per_s_after_baseline": early, "tokens_per_s_last_window": late,
        "tokens_per_s_change_pct": change,
        "targets": {"rss_growth_max_pct": RSS_GROWTH_MAX_PCT, "fd_growth_max": 0,
                    "tokens_per_s_change_max_pct": TOKENS_PER_S_CHANGE_MAX_PCT},
        "passed": {"rss": max(rss.values()) <= RSS_GROWTH_MAX_PCT,
                   "fds": max(fds.values()) <= 0,
                   "tokens_per_s": abs(change) <= TOKENS_PER_S_CHANGE_MAX_PCT},
    }


def bench_soak(cluster_path: Path, model: str, global_batch: int, seq_len: int, steps: int,
               checkpoint_every: int, time_scale: float | None, sample_every: int,
               checkpoint_dir: str) -> dict:
    cluster = load_cluster(cluster_path)
    source = load_model(model)
    spec = source.spec(seq_len)
    plan = data_parallel_plan(cluster, CostModel(cluster, spec), global_batch)
    config = TrainConfig(model=model, steps=steps, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every)
    corpus = load_corpus(None, config.seed)
    if time_scale is None:  # paced well above the CPU's own time: steady steps on a busy host
        time_scale = PACE * calibrate_time_scale(plan, CostModel(cluster, spec), corpus,
                                                 config, source)
    baseline = min(100, steps // 3)
    # Samples are taken as rank 0 reports a step, while the workers go on: never as a
    # checkpoint is being written (its files open), and the last one before the workers end.
    def quiet(step: int) -> int:
        return step + 1 if step % checkpoint_every == 0 else step

    last = steps - 1 if (steps - 1) % checkpoint_every else steps - 2
    marks = {quiet(m) for m in [1, baseline, *range(sample_every, steps - 1, sample_every)]}
    marks = {m for m in marks if m < last} | {last}
    t0 = time.monotonic()
    samples: list[Sample] = []
    step_s: list[float] = []

    def on_step(rec: StepRecord) -> None:  # in the launcher, while the workers run
        step_s.append(rec.step_s)
        if rec.step + 1 in marks:
            samples.append(sample(rec.step + 1, t0))

    result = train(cluster, plan, config, corpus=corpus, progress=on_step,
                   time_scale=time_scale)
    tokens = plan.global_batch * plan.seq_len
    windows = [{"steps": [a, min(a + baseline, steps)],
                "tokens_per_s": window_tokens_per_s(step_s, a, min(a + baseline, steps), tokens)}
               for a in range(0, steps, max(baseline, 1))]
    first = samples[0]
    return {
        "emulated": result.is_emulated, "model": model, "global_batch": global_batch,
        "seq_len": seq_len, "steps": steps, "checkpoint_every": checkpoint_every,
        "time_scale": time_scale, "devices": plan.devices(), "wall_s": time.monotonic() - t0,
        "rss_start_bytes": {"launcher": first.launcher_rss_bytes,
                            "workers": sum(first.worker_rss_bytes)},
        "rss_baseline_bytes": _rss(samples, baseline), "rss_end_bytes": _rss(samples, last),
        **soak_figures(samples, step_s, tokens, baseline),
        "tokens_per_s_windows": windows, "samples": [asdict(s) for s in samples],
    }


def _rss(samples: list[Sample], step: int) -> dict[str, int]:
    s = next(s for s in samples if s.step >= step)
    return {"launcher": s.launcher_rss_bytes, "workers": sum(s.worker_rss_bytes)}


@bench_app.command("soak")
@user_errors
def soak(
    cluster: Path = typer.Option(Path("examples/clusters/three-kinds.yaml"), help="cluster YAML"),
    model: str = typer.Option("tiny"),
    global_batch: int = typer.Option(12, min=1),
    seq_len: int = typer.Option(16, min=2),
    steps: int = typer.Option(1000, min=9, help="steps; figures compare step 100 (or a "
                              "third of the run) with the end"),
    checkpoint_every: int = typer.Option(50, min=1),
    time_scale: float | None = typer.Option(None, help="emulation stretch; default "
                                            f"{PACE:g} x the calibrated one"),
    sample_every: int = typer.Option(100, min=1, help="steps between resource samples"),
    json_path: Path | None = typer.Option(None, "--json", help="write figures as JSON"),
) -> None:
    """Train many steps of a tiny model with checkpoints on and report memory, descriptor and
    throughput drift (a leak shows as growth from step 100 to the end)."""
    check_writable_file(json_path, "--json")
    with tempfile.TemporaryDirectory(prefix="hetrain-soak-ckpt-") as scratch:
        out = bench_soak(cluster, model, global_batch, seq_len, steps, checkpoint_every,
                         time_scale, sample_every, scratch)
    rss, fds = out["rss_growth_pct"], out["fd_growth"]
    Console().print(
        f"{steps} steps in {out['wall_s']:.0f} s{emulated_tag(out['emulated'])}: resident "
        f"memory {rss['launcher']:+.1f} % launcher, {rss['workers']:+.1f} % workers from step "
        f"{out['baseline_step']}; descriptors {fds['launcher']:+d} launcher, "
        f"{fds['workers']:+d} workers; tokens/s {out['tokens_per_s_change_pct']:+.1f} % "
        f"(last {out['window_steps']} steps vs steps {out['baseline_step']}-"
        f"{2 * out['baseline_step']})", highlight=False)
    write_json(json_path, out)

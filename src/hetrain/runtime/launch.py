"""Start the workers of a plan: spawned locally (a loopback rendezvous store hosted here,
workers that die with this process), or under torchrun; gather their reports into a
RunResult. Workers that die, fall silent (heartbeats) or fail stop the whole job cleanly, with
one line naming the cause; their tracebacks go to a log file in the run folder."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue as queue_mod
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from hetrain.cluster.devices import bind_process
from hetrain.cluster.topology import Cluster
from hetrain.cost.model import LIBRARY_WORKSPACE_BYTES, CostModel
from hetrain.data.corpus import Corpus
from hetrain.data.loading import load_corpus
from hetrain.errors import HetrainError, RuntimeFailure
from hetrain.model.loading import as_model, load_model
from hetrain.model.source import ModelSource
from hetrain.model.spec import ModelSpec
from hetrain.plan.schedule import build_schedule
from hetrain.plan.types import Plan
from hetrain.plan.validate import check_memory, plan_memory_fn, validate_plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.emulation import (
    anchored_time_scale,
    auto_time_scale,
    real_devices_by_kind,
    seconds_per_sample,
)
from hetrain.runtime.events import events_folder, write_events
from hetrain.runtime.failure import Heartbeats, Suspect, lost_message, lost_ranks
from hetrain.runtime.faults import Faults
from hetrain.runtime.job import Job
from hetrain.runtime.loop import run_worker
from hetrain.runtime.precision import param_dtype, run_memory_fn
from hetrain.runtime.preflight import preflight
from hetrain.runtime.recipe import dropout_note
from hetrain.runtime.records import StepRecord, report_path
from hetrain.runtime.rendezvous import LOOPBACK, LoopbackStore
from hetrain.runtime.results import RunResult, gather_result
from hetrain.runtime.runlock import RunComplete, run_folder
from hetrain.runtime.watchdog import beat_key, supervised_worker

ProgressFn = Callable[[StepRecord], None]  # rank 0's record of each step
SuspectFn = Callable[[Suspect], None]  # a worker late with its heartbeat
ReplanFn = Callable[[Cluster, Plan, TrainConfig], Plan]  # a plan for the survivors
WORKER_LOG = "workers.log"
EXIT_GRACE_S = 30.0  # a worker that wrote its report exits within this, or is killed
BEAT_CHECK_S = 0.25  # the launcher looks at heartbeats this often
POLL_S = 0.05  # and at progress records and reports this often (a worker's exit: at once)


def plan_model(plan: Plan, model: ModelSource | nn.Module | None) -> ModelSource:
    """The model object a run trains: the one given (a user's module: as_model), else the
    one the plan names; in the plan's partition units (Plan.half_layers)."""
    source = as_model(model) if model is not None else load_model(plan.model)
    return source.units(plan.half_layers)


def plan_spec(plan: Plan, model: ModelSource | nn.Module | None) -> ModelSpec:
    return plan_model(plan, model).spec(plan.seq_len)


def check_plan(plan: Plan, cluster: Cluster, spec: ModelSpec,
               precision: str | None = None) -> dict[str, float]:
    """Validate the plan and its memory; returns estimated bytes per device of each group,
    in the dtype each kind computes in under `precision` (the plan's dtypes if None)."""
    validate_plan(plan, cluster, spec)
    cost = CostModel(cluster, spec)
    schedule = build_schedule(plan, cost)
    memory = plan_memory_fn(plan, cost)
    if precision is not None:
        memory = run_memory_fn(memory, precision, cluster)
    return check_memory(plan, cluster, memory, schedule.peak_in_flight)


def calibrate_time_scale(plan: Plan, cost: CostModel, corpus: Corpus, config: TrainConfig,
                         model: ModelSource | None = None,
                         real: dict[str, list[str]] | None = None) -> float:
    """Time scale of the emulated kinds: anchored on the measured speed of the real kind that
    carries the most samples when the job has one, else on the CPU's. `model`: the plan's
    model when None."""
    model = model if model is not None else load_model(plan.model)
    real = real_devices_by_kind(plan, cost.cluster) if real is None else real
    kind_of = {r: [plan.group_by_name[g].kind for g in route.stages]
               for r, route in enumerate(plan.routes)}
    routes = [r for r in kind_of if any(k in real for k in kind_of[r])] or list(kind_of)
    # The micro-batch size carrying most samples: time per sample depends on it.
    best = max(routes, key=lambda r: plan.routes[r].samples)
    route = plan.routes[best]
    kind = next((k for k in kind_of[best] if k in real), kind_of[best][0])
    device = real[kind][0] if kind in real else "cpu"
    inputs, targets = corpus.global_batch(0, route.micro_batch_size, plan.seq_len)
    whole = model.build_stage(0, model.n_layers, config.seed)
    if device != "cpu":
        bind_process(cost.cluster.kinds[kind], device)
    whole.to(device=device, dtype=param_dtype(config.precision))
    per_sample = seconds_per_sample(whole, inputs, targets, device)
    whole.zero_grad(set_to_none=True)
    if kind in real:
        return anchored_time_scale(plan, cost, kind, per_sample)
    return auto_time_scale(plan, cost, per_sample, len(plan.devices()))


def train(cluster: Cluster, plan: Plan, config: TrainConfig, *,
          model: ModelSource | nn.Module | None = None, corpus: Corpus | None = None,
          out_dir: str | Path | None = None, progress: ProgressFn | None = None,
          time_scale: float | None = None, on_suspect: SuspectFn | None = None,
          faults: Faults | None = None) -> RunResult:
    """Run `config.steps` optimizer steps of `plan`; the result holds figures and parameters.
    Every input is checked first (runtime/preflight.py), before anything is written. With
    `config.checkpoint_dir`, this process owns the folder for the run and continues the
    folder's run by default (runtime/runlock.py); RunComplete when it is already done.
    `faults`: tests only (runtime/faults.py). Most callers want runtime.entry.run_training,
    which adds resilience and torchrun."""
    model = plan_model(plan, model)
    corpus = preflight(cluster, plan, config, model=model, corpus=corpus,
                       out_dir=out_dir, time_scale=time_scale)
    check_plan(plan, cluster, model.spec(plan.seq_len), config.precision)
    note_dropout(model)
    with run_folder(config, plan) as config:
        return run_attempt(cluster, plan, config, model=model, corpus=corpus,
                           out_dir=out_dir, progress=progress, time_scale=time_scale,
                           on_suspect=on_suspect, faults=faults)


def run_attempt(cluster: Cluster, plan: Plan, config: TrainConfig, *,
                model: ModelSource | nn.Module | None = None, corpus: Corpus | None = None,
                out_dir: str | Path | None = None, progress: ProgressFn | None = None,
                time_scale: float | None = None, on_suspect: SuspectFn | None = None,
                faults: Faults | None = None) -> RunResult:
    """One launch of the workers, its inputs already checked and the checkpoint folder
    (if any) already owned by this process."""
    model = plan_model(plan, model)
    spec = model.spec(plan.seq_len)
    estimated = check_plan(plan, cluster, spec, config.precision)  # cheap; a re-plan too
    corpus = corpus or load_corpus(config.data, config.seed)
    real = real_devices_by_kind(plan, cluster)  # fails here for a missing `mode: real` kind
    emulated = set(plan.kinds()) - set(real)
    estimated = _as_emulated(estimated, plan, cluster, emulated)
    cost = CostModel(cluster, spec)
    scale = time_scale or config.time_scale or (
        calibrate_time_scale(plan, cost, corpus, config, model, real) if emulated
        else 1.0)
    keep = out_dir is not None
    out = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="hetrain-run-"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("rank*.pt")) + list(out.glob("error*.txt")):
        stale.unlink()
    ctx = mp.get_context("spawn")
    store = LoopbackStore(len(plan.devices()), config.op_timeout_s)
    job = Job(cluster=cluster, plan=plan, config=config, out_dir=str(out), time_scale=scale,
              emulated=emulated, torch_device_of=_real_devices(plan, real),
              model=model, corpus=corpus, master_addr=LOOPBACK,
              master_port=store.port, progress=ctx.Queue(), faults=faults)
    try:
        _spawn_and_wait(job, ctx, progress, store, on_suspect)
        result = gather_result(job, out, estimated)
    except RuntimeFailure as err:
        log = _keep_worker_log(out, config, keep)
        raise type(err)(f"{err}; worker tracebacks: {log}" if log else str(err),
                        lost_devices=err.lost_devices) from None
    finally:
        store.close()
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if not result.losses:  # resumed at a checkpoint at or past `steps`
        raise RunComplete(f"the run is already at step {config.steps} or past it; nothing to "
                          "do", config.steps)
    folder = events_folder(config, out_dir)
    if folder is not None:  # TensorBoard: each attempt appends its steps
        write_events(folder, result, cluster, spec)
    return result


def note_dropout(model: ModelSource) -> None:
    """Once per run, before any worker starts: active dropout is not plan-invariant."""
    note = dropout_note(model.user_module())
    if note:
        print(f"hetrain: {note}", file=sys.stderr, flush=True)


def _as_emulated(estimated: dict[str, float], plan: Plan, cluster: Cluster,
                 emulated: set[str]) -> dict[str, float]:
    """The estimate reported beside an emulated worker's measured peak: what that CPU process
    holds, without the accelerator libraries' workspaces the plan was checked with."""
    out = dict(estimated)
    for g in plan.stage_groups:
        if g.kind in emulated and cluster.kinds[g.kind].device_type != "cpu":
            out[g.name] = estimated[g.name] - LIBRARY_WORKSPACE_BYTES
    return out


def _keep_worker_log(out: Path, config: TrainConfig, keep: bool) -> Path | None:
    """The workers' error reports (tracebacks), gathered into the run folder's log."""
    reports = sorted(out.glob("error*.txt"), key=lambda p: int(p.stem.removeprefix("error")))
    if not reports:
        return None
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else \
        out if keep else Path(tempfile.gettempdir())
    log = folder / (WORKER_LOG if folder != Path(tempfile.gettempdir()) else
                    f"hetrain-{os.getpid()}-{WORKER_LOG}")
    try:
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
            for report in reports:
                f.write(f"[{report.stem.replace('error', 'worker ')}] {report.read_text()}\n")
    except OSError:
        return None
    return log


def _real_devices(plan: Plan, real: dict[str, list[str]]) -> dict[str, str]:
    """Map the plan's devices of real kinds to torch devices, in order (one process per
    device: cuda:0, cuda:1, ...; every process of the cpu kind on "cpu")."""
    out = {}
    for kind, torch_devices in real.items():
        devices = [d for g in plan.stage_groups if g.kind == kind for d in g.devices]
        out.update(zip(devices, torch_devices, strict=False))
    return out


def _worker_entry(job: Job, rank: int, world: int, init_method: str | None = None) -> None:
    """A torchrun rank: bind to its real device (importing the kind's plugin) first."""
    device_id = job.rank_devices[rank]
    if device_id in job.torch_device_of:
        bind_process(job.cluster.kind_of(device_id), job.torch_device_of[device_id])
    run_worker(job, rank, world, init_method)


def _spawn_and_wait(job: Job, ctx, progress: ProgressFn | None, store: LoopbackStore,
                    on_suspect: SuspectFn | None) -> None:
    world = len(job.rank_devices)
    procs = [ctx.Process(target=supervised_worker, args=(job, r, world, os.getpid()),
                         daemon=True, name=f"hetrain-worker-{r}") for r in range(world)]
    for p in procs:
        p.start()
    beats = Heartbeats(store, beat_key, world, job.config.hang_timeout_s)
    deadline = time.monotonic() + (job.config.run_timeout_s or float("inf"))
    next_beat_check = 0.0
    reported_at: dict[int, float] = {}
    try:
        while True:
            _drain(job, progress, beats)
            codes = _exit_codes(job, procs)
            if all(c == 0 for c in codes) or _all_reported(job, codes, reported_at):
                break
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                grace_s = job.config.op_timeout_s + 2.0
                lost = lost_ranks(procs, job.out_dir, grace_s)
                _drain(job, progress, beats)
                raise RuntimeFailure(
                    lost_message(job.rank_devices, lost, procs, grace_s) if lost else
                    _failure_message(job, failed, codes),
                    lost_devices=[job.rank_devices[r] for r in lost])
            if time.monotonic() >= next_beat_check:
                next_beat_check = time.monotonic() + BEAT_CHECK_S
                _check_heartbeats(job, beats, codes, on_suspect)
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the run did not finish within {job.config.run_timeout_s:.0f}"
                                     " s (run_timeout_s)")
            # Woken by a worker's exit at once, else every POLL_S for progress (only the live
            # workers' sentinels: an exited one's stays ready).
            mp_connection.wait([p.sentinel for p, c in zip(procs, codes, strict=True)
                                if c is None], timeout=POLL_S)
        _drain(job, progress, beats)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)


def _exit_codes(job: Job, procs: list) -> list[int | None]:
    """Each worker's exit code, 0 for one that wrote its report (records.report_path)
    whatever it exited with: its part of the run is complete, and a signal
    in its interpreter's teardown (a preemption's SIGTERM forwarded as it finished) or a
    teardown crash does not undo it."""
    out = Path(job.out_dir)
    return [0 if p.exitcode not in (None, 0) and report_path(out, r).exists() else p.exitcode
            for r, p in enumerate(procs)]


def _all_reported(job: Job, codes: list[int | None], reported_at: dict[int, float]) -> bool:
    """Every worker wrote its report and those still alive are stuck past EXIT_GRACE_S in
    their interpreter's teardown (a process group freed while its thread waits for the GIL
    can deadlock there): the run is complete, the stragglers are killed by the caller."""
    now = time.monotonic()
    out = Path(job.out_dir)
    for r, code in enumerate(codes):
        if code is None and report_path(out, r).exists():
            reported_at.setdefault(r, now)
    alive = [r for r, c in enumerate(codes) if c is None]
    return (all(c in (None, 0) for c in codes)
            and all(r in reported_at and now - reported_at[r] > EXIT_GRACE_S for r in alive))


def _check_heartbeats(job: Job, beats: Heartbeats, codes: list[int | None],
                      on_suspect: SuspectFn | None) -> None:
    """A live worker silent past the hang timeout is lost (its peers, waiting on it, still
    beat); one merely late is named to the progress hook as the suspect."""
    beats.poll()
    out = Path(job.out_dir)
    # A worker that wrote its report or its error is exiting: its silence means nothing.
    alive = [r for r, c in enumerate(codes) if c is None and not report_path(out, r).exists()
             and not (out / f"error{r}.txt").exists()]
    hung = beats.hung(alive)
    if hung:
        parts = [f"worker {r} ({job.rank_devices[r]}) sent no heartbeat for "
                 f"{beats.silent_s(r):.0f} s (hang timeout {beats.allowed_s(r):.0f} s): stopped "
                 "or hung" for r in hung]
        raise RuntimeFailure("; ".join(parts) + "; the other workers were stopped",
                             lost_devices=[job.rank_devices[r] for r in hung])
    suspect = beats.suspect(alive)
    if suspect is not None and on_suspect is not None:
        on_suspect(Suspect(suspect, job.rank_devices[suspect], beats.silent_s(suspect)))


def _drain(job: Job, progress: ProgressFn | None, beats: Heartbeats) -> None:
    while True:
        try:
            record = job.progress.get_nowait()
        except queue_mod.Empty:
            return
        beats.note_step(record.step_s)
        if progress is not None:
            progress(record)


def _failure_message(job: Job, failed: list[int], codes: list[int | None]) -> str:
    """One line: a cause every reporting worker shares (a collective saw it alike), else the
    first user-facing (hetrain) error, else the first report."""
    out = Path(job.out_dir)
    first: dict[int, str] = {}
    for r in range(len(job.rank_devices)):
        err = out / f"error{r}.txt"
        if err.exists():
            lines = err.read_text().splitlines()
            first[r] = lines[0] if lines else "no message"
    if first:
        if len(set(first.values())) == 1:  # every reporting worker saw the same thing
            kind, _, message = next(iter(first.values())).partition(": ")
            return message if kind in _HETRAIN_ERRORS and message else \
                f"{next(iter(first.values()))} (in every worker that reported)"
        ours = [r for r, line in first.items() if line.split(":", 1)[0] in _HETRAIN_ERRORS]
        r = (ours or sorted(first))[0]
        return f"worker {r} ({job.rank_devices[r]}) failed: {first[r]}"
    r = failed[0]
    return (f"worker {r} ({job.rank_devices[r]}) died with exit code {codes[r]}; "
            "the other workers were stopped")


def _error_names(cls: type) -> set[str]:
    return {cls.__name__} | {n for sub in cls.__subclasses__() for n in _error_names(sub)}


_HETRAIN_ERRORS = _error_names(HetrainError) | {"TrainingDiverged"}

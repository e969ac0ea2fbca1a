"""Checkpoints that survive crashes mid-write and reload under any other plan.

A checkpoint folder (`checkpoint_dir`):

    latest                   "step-000006": the newest committed checkpoint (replaced atomically)
    step-000006/             one committed checkpoint
        .metadata            torch.distributed.checkpoint (DCP) index of every tensor
        __<rank>_0.distcp    DCP data, one file per writing rank
        meta.json            step, model, seed, precision, run id, recipe, the fp16 loss
                             scale, and the plan it was taken under
        manifest.json        size and SHA-256 of every other file; written last
    step-000009.tmp/         being written, or left by a crash: never read
    run.json, .lock          the folder's run and its owner (runtime/runlock.py)

Why this layout:

- Tensors are stored by canonical (full-model) name with full, unsharded values, so a plan
  with other stage groups, layer ranges, TP degrees or kinds reads what it needs: resharding
  is a slice at load time, nothing depends on the writer's layout. Each weight and its AdamW
  state (exp_avg, exp_avg_sq, step) is written once, by TP rank 0 of the first stage group (in
  plan order) holding it; all holders of a weight stay identical (same summed gradient, same
  optimizer), so any one of them would do. Under ZeRO-1 the shards of a weight's AdamW state
  are assembled at save time, and sliced again at load time for the new plan's shards.
- DCP does the collective part of saving: every rank gives its own keys, ranks write their
  files in parallel (fsynced), the coordinator merges one `.metadata`. Loading needs no
  collective: each rank reads only the keys of its layers and DCP narrows each full tensor
  straight into the rank's DTensor shard.
- DCP alone is neither atomic nor checksummed. So the folder is written as `.tmp`, a
  manifest with SHA-256 per file is written last and fsynced, the folder is renamed (the
  commit), then `latest` is replaced. A checkpoint whose manifest is missing, or whose files
  differ from it in size or checksum, is refused with a CheckpointError that names the file,
  and the next older one is used.
- DCP pickles `.metadata`: it is read by a restricted unpickler (runtime/safe_load.py), so a
  crafted checkpoint is refused by name instead of running code. Only checkpoints of the
  folder's run (run.json) are candidates: a folder never mixes runs.
- The data position is the step: the batch of step k is a pure function of (seed, k).
  Training draws no random numbers after the seeded init; rank 0's CPU RNG state is still
  stored and restored on every rank, for user models that do (dropout); each step reseeds
  every worker from (seed, rank, step) (runtime/recipe.py), so a resumed run draws what an
  uninterrupted one would.
- The learning-rate schedule and clipping are pure functions of (settings, step): meta.json
  keeps the settings (`recipe`), and a resume under other settings says so once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from hetrain.errors import CheckpointError
from hetrain.plan.io import atomic_write_text
from hetrain.plan.types import Plan
from hetrain.runtime.faults import Faults, checkpoint_writer, while_writing
from hetrain.runtime.layout import FORMAT as FORMAT
from hetrain.runtime.layout import LATEST as LATEST
from hetrain.runtime.layout import MANIFEST as MANIFEST
from hetrain.runtime.layout import META as META
from hetrain.runtime.layout import committed_steps as committed_steps
from hetrain.runtime.layout import run_steps as run_steps
from hetrain.runtime.layout import step_dir as step_dir
from hetrain.runtime.recipe import recipe_changes
from hetrain.runtime.safe_load import SafeReader
from hetrain.runtime.stage import full_tensor

if TYPE_CHECKING:
    from hetrain.runtime.grad_sync import GradSync

KEEP = 3  # committed checkpoints kept: a corrupted newest one still leaves good ones
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class TrainState:
    """What a checkpoint saves and restores of one rank, given explicitly (never the worker):
    its parameters by canonical name and layer, its optimizers, and who it is in the plan."""

    rank: int
    rank_devices: list[str]  # device id of every rank: a failed write names its device
    plan: Plan
    group: str  # this rank's stage group
    tp_index: int
    params: list[tuple[str, int, torch.Tensor]]  # (canonical name, layer, parameter)
    optimizer: torch.optim.Optimizer  # weights held by this group alone
    grad_sync: GradSync  # ZeRO-1 shards of shared weights; who holds each layer
    seed: int
    precision: str
    run_id: str | None
    recipe: dict[str, Any] = field(default_factory=dict)  # runtime.recipe.recipe_state
    # fp16 loss scaling (runtime.precision.LossScaler, the same on every rank): its scale and
    # clean-step count are saved and restored, so a resumed run scales as an unbroken one.
    scaler: Any = None


# --- verification ----------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (its write did "
                              "not finish)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def file_problem(path: Path, name: str, entry: dict[str, Any]) -> str | None:
    """Why `path/name` differs from its manifest entry, or None when it matches."""
    try:
        size = (path / name).stat().st_size
    except FileNotFoundError:
        return f"file {name} is missing"
    if size != entry["bytes"]:
        return f"file {name} is truncated or altered: {size} bytes, the manifest says " \
               f"{entry['bytes']}"
    digest = _sha256(path / name)
    if digest != entry["sha256"]:
        return f"file {name} is corrupted: SHA-256 {digest[:12]}..., the manifest says " \
               f"{entry['sha256'][:12]}..."
    return None


def verify_checkpoint(path: str | Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The manifest of a sound checkpoint; CheckpointError naming the first bad file.
    `share=(i, n)` checks every n-th file from the i-th (ranks split the hashing)."""
    path = Path(path)
    manifest = read_manifest(path)
    names = sorted(manifest["files"])[share[0]::share[1]]
    for name in names:
        problem = file_problem(path, name, manifest["files"][name])
        if problem:
            raise CheckpointError(f"checkpoint {path} refused: {problem}")
    return manifest


@dataclass
class Found:
    """The checkpoint to resume from, and the newer ones refused on the way."""

    step: int
    path: Path
    refused: list[str] = field(default_factory=list)


def find_latest(root: str | Path) -> Found | None:
    """The newest checkpoint under `root` that verifies (whole, in this process); None when
    there is none at all; CheckpointError when every one is damaged."""
    refused = []
    for step in run_steps(root):
        try:
            verify_checkpoint(step_dir(root, step))
        except CheckpointError as err:
            refused.append(str(err))
            continue
        return Found(step, step_dir(root, step), refused)
    if refused:
        raise CheckpointError("no usable checkpoint: " + "; ".join(refused))
    return None


def resolve_checkpoint(path: str | Path) -> Found:
    """A checkpoint folder (`step-*`, verified) or a checkpoint_dir (its newest good one)."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / ".metadata").exists():
        return Found(int(verify_checkpoint(path)["step"]), path)
    found = find_latest(path)
    if found is None:
        raise CheckpointError(f"no checkpoint under {path}")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- saving ----------------------------------------------------------------------------------
def save_checkpoint(state: TrainState, root: str | Path, step: int,
                    faults: Faults | None = None) -> None:
    """Collective: every rank calls it after the optimizer step that ends step `step`.
    `faults`: tests only (runtime/faults.py)."""
    root, final = Path(root), step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if state.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = _state_to_save(state)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(tensors, storage_writer=checkpoint_writer(faults, state.rank, step, tmp))
        while_writing(faults, state.rank, step, tmp)
        dist.barrier()  # every rank's data is on disk
        if state.rank == 0:
            _commit(state, root, tmp, final, step)
    except (OSError, CheckpointException) as err:
        raise _write_error(state, err, root, step) from None
    dist.barrier()  # nobody runs on (or dies) before the commit


def _write_error(state: TrainState, err: BaseException, root: Path,
                 step: int) -> CheckpointError:
    """One line for a failed checkpoint write: the cause, the device, the folder. DCP wraps
    each rank's error; the rank that failed is named, not the one reporting."""
    failures = getattr(err, "failures", None) or {state.rank: (err, None)}
    rank, (cause, _) = next(iter(sorted(failures.items())))
    device = state.rank_devices[rank]
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        what = "no space left on device"
    elif isinstance(cause, OSError) and cause.strerror:
        what = cause.strerror[0].lower() + cause.strerror[1:]
    else:
        what = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
    return CheckpointError(f"{what} writing checkpoint step {step} in {root} (worker {rank}, "
                           f"{device})")


def _writer_of(state: TrainState, layer: int) -> str:
    """The stage group that writes the weights of `layer`: the first holder in plan order."""
    holders = state.grad_sync.holders[layer]
    return next(g.name for g in state.plan.stage_groups if g.name in holders)


def _state_to_save(train: TrainState) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    if train.rank == 0:
        state["rng/torch"] = torch.get_rng_state()
    # ZeRO-1: each bucket's AdamW state is assembled from its shards (a collective among the
    # bucket's members), so the checkpoint holds whole state whatever the sharding.
    zero_state = train.grad_sync.gathered_state()
    for name, layer, p in train.params:
        if _writer_of(train, layer) != train.group:
            continue
        # Every TP rank of the writer group gathers (a collective); TP rank 0 writes.
        values = {f"model/{name}": full_tensor(p.detach())}
        slot = zero_state.get(id(p)) or train.optimizer.state.get(p, {})
        for key, value in slot.items():
            values[f"optim/{name}/{key}"] = full_tensor(value.detach())
        if train.tp_index == 0:
            state.update(values)
    return state


def _commit(state: TrainState, root: Path, tmp: Path, final: Path, step: int) -> None:
    meta = {"format": FORMAT, "step": step, "model": state.plan.model, "seed": state.seed,
            "precision": state.precision, "saved_at": time.time(),
            "run_id": state.run_id or "legacy", "recipe": state.recipe,
            "plan": state.plan.model_dump(mode="json")}
    if state.scaler is not None and state.scaler.enabled:
        meta["loss_scale"] = {"scale": state.scaler.scale,
                              "good_steps": state.scaler.good_steps}
    _write_synced(tmp / META, json.dumps(meta, indent=1))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_synced(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files},
                                             indent=1))
    _fsync_dir(tmp)
    if final.exists():  # a step redone after a resume: the new copy replaces the old
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    _prune(root, step)


def _prune(root: Path, step: int) -> None:
    """Keep the KEEP newest committed checkpoints up to `step`; drop older ones and debris."""
    older = [s for s in committed_steps(root) if s < step]
    for s in older[KEEP - 1:]:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for debris in list(root.glob("step-*.tmp")) + list(root.glob("step-*.old")):
        digits = debris.name.removeprefix("step-").split(".")[0]
        if digits.isdigit() and int(digits) < step:
            shutil.rmtree(debris, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- loading ---------------------------------------------------------------------------------
def load_latest(train: TrainState, root: str | Path) -> int:
    """Collective: load the newest good checkpoint into this rank's stage and optimizer;
    returns its step (0 when there is none). Damaged checkpoints are skipped, with a message."""
    found = _agree_on_checkpoint(Path(root))
    if found is None:
        return 0
    meta = json.loads((found.path / META).read_text())
    if meta["model"] != train.plan.model:
        raise CheckpointError(f"checkpoint {found.path} holds model {meta['model']!r}, the plan "
                              f"trains {train.plan.model!r}")
    changed = recipe_changes(meta.get("recipe"), train.recipe)
    if changed and train.rank == 0:
        print(f"hetrain: {changed}", file=sys.stderr, flush=True)
    reader = SafeReader(found.path)
    stored = set(reader.read_metadata().state_dict_metadata)
    zero_state: dict[int, dict[str, torch.Tensor]] = {}
    state = _state_to_load(train, stored, zero_state)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as err:  # DCP wraps per-rank errors; keep the first line
        raise CheckpointError(f"checkpoint {found.path} does not fit this plan: "
                              f"{str(err).strip().splitlines()[0]}") from err
    train.grad_sync.load_state(zero_state)
    scale = meta.get("loss_scale")
    if scale is not None and train.scaler is not None and train.scaler.enabled:
        train.scaler.scale = float(scale["scale"])
        train.scaler.good_steps = int(scale["good_steps"])
    if "rng/torch" in state:
        torch.set_rng_state(state["rng/torch"])
    return found.step


def _agree_on_checkpoint(root: Path) -> Found | None:
    """Newest checkpoint all ranks verified: rank 0 lists, every rank hashes a share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    listing = [run_steps(root) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    refused = []
    for step in listing[0]:
        try:
            verify_checkpoint(step_dir(root, step), share=(rank, world))
            problem = None
        except CheckpointError as err:
            problem = str(err)
        problems: list[str | None] = [None] * world
        dist.all_gather_object(problems, problem)
        bad = sorted({p for p in problems if p})
        if not bad:
            if refused and rank == 0:
                print(f"hetrain: {'; '.join(refused)}; resuming from {step_dir(root, step)}",
                      file=sys.stderr, flush=True)
            return Found(step, step_dir(root, step), refused)
        refused.extend(bad)
    if refused:
        raise CheckpointError("no usable checkpoint: " + "; ".join(refused))
    return None


def _state_to_load(train: TrainState, stored: set[str],
                   zero_state: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Targets for DCP: this rank's parameters and AdamW state (DTensor shards under TP).
    ZeRO-1: whole AdamW state of shared weights into `zero_state` (the sync keeps shards)."""
    state: dict[str, torch.Tensor] = {}
    if "rng/torch" in stored:
        state["rng/torch"] = torch.get_rng_state()
    for name, _, p in train.params:
        state[f"model/{name}"] = p.detach()  # shares storage: DCP copies into it
        if f"optim/{name}/exp_avg" not in stored:
            continue
        if id(p) in train.grad_sync.zero_params:
            slot = zero_state[id(p)] = {
                "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                "exp_avg": torch.empty(p.shape, dtype=p.dtype),
                "exp_avg_sq": torch.empty(p.shape, dtype=p.dtype)}
            for key in _ADAM_STATE:
                state[f"optim/{name}/{key}"] = slot[key]
            continue
        # The state AdamW creates at its first step, filled from the checkpoint.
        slot = train.optimizer.state[p]
        slot["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        slot["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        slot["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key in _ADAM_STATE:
            state[f"optim/{name}/{key}"] = slot[key]
    return state


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# --- reading outside a run -------------------------------------------------------------------
def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full parameters by canonical name, and meta.json, of a verified checkpoint folder."""
    path = Path(path)
    reader = SafeReader(path)
    stored = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in stored.items() if key.startswith("model/")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)
    meta = json.loads((path / META).read_text())
    return {key.removeprefix("model/"): t for key, t in state.items()}, meta

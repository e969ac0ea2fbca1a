"""Checks of every user input before any worker starts and before anything is written.

The CLI (`hetrain train`), the runtime entry (`runtime.launch.train`) and `hetrain.fit` all
call these, so a bad option, a model/plan/data/checkpoint mismatch, an output path that
cannot be written or a run this machine cannot hold is refused with one line naming the
field and the fix, instead of a traceback from inside the workers after they spawned.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from hetrain.cluster.topology import Cluster
from hetrain.comm.bridge import require_bridge
from hetrain.data.corpus import Corpus
from hetrain.data.loading import load_corpus
from hetrain.errors import CheckpointError, ConfigError, DataError, ModelError, PlanError
from hetrain.model.loading import load_model
from hetrain.model.source import ModelSource
from hetrain.plan.io import check_writable_dir, check_writable_file
from hetrain.plan.types import Plan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.emulation import real_devices_by_kind
from hetrain.runtime.layout import META, committed_steps, step_dir

# Local runs spawn one process per device; more than this would exhaust the machine's
# memory (each worker holds a Python interpreter and torch, a few hundred MB) long before
# the run could start. Raise it with HETRAIN_MAX_LOCAL_WORKERS on a big host.
MAX_LOCAL_WORKERS = 64
# Tokens of one step's global batch: every worker draws the whole batch as int64 inputs and
# targets (16 bytes a token), so 2**27 tokens is already 2 GiB per worker.
MAX_TOKENS_PER_STEP = 2**27

def option_name(field: str, cli: bool) -> str:
    """How the user spelled `field`: `--time-scale` on the command line, `time_scale` in
    Python."""
    return "--" + field.replace("_", "-") if cli else field


def check_positive(value: float | int | None, name: str, whole: bool = False) -> None:
    """A finite number > 0 (a whole one when `whole`); None passes (the default applies)."""
    if value is None:
        return
    kind = "a whole number" if whole else "a finite number"
    ok = isinstance(value, numbers.Integral if whole else numbers.Real)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be {kind} > 0 (got {value!r})")


def check_batch(global_batch: int, seq_len: int, cli: bool) -> None:
    """Batch and sequence are whole numbers > 0 and one step's tokens fit in memory."""
    gb, sl = option_name("global_batch", cli), option_name("seq_len", cli)
    check_positive(global_batch, gb, whole=True)
    check_positive(seq_len, sl, whole=True)
    if seq_len < 2:
        raise ConfigError(f"{sl}: must be at least 2 (got {seq_len})")
    if global_batch * seq_len > MAX_TOKENS_PER_STEP:
        raise ConfigError(f"{gb} {global_batch} x {sl} {seq_len} = "
                          f"{global_batch * seq_len:,} tokens per step, more than the limit of "
                          f"{MAX_TOKENS_PER_STEP:,} (each worker holds the whole batch); use "
                          "a smaller batch")


# --- model, data, checkpoint -----------------------------------------------------------------
def check_model(plan: Plan, model: ModelSource) -> None:
    """The model can be built here, splits as the plan's TP groups do, and the plan's
    sequence length fits it."""
    model.check_trainable()
    for group in plan.stage_groups:
        model.check_tp(group.tp)
    check_seq_len(model, plan.seq_len)
    if plan.seq_chunks > 1 and not model.sequence_pieces:
        raise PlanError(f"seq_chunks: model {model.name!r} runs whole sequences only (its "
                        "attention does not read earlier pieces' keys); set seq_chunks: 1")


def check_seq_len(model: ModelSource, seq_len: int, cli: bool = False) -> None:
    """A sequence within the model's positions."""
    most = model.max_seq_len
    if most is not None and seq_len > most:
        raise ModelError(f"{option_name('seq_len', cli)} {seq_len} is longer than "
                         f"{model.name}'s {model.max_seq_field} {most}; pass --seq-len {most} "
                         "or less")


def check_corpus(corpus: Corpus, plan: Plan, vocab: int | None) -> None:
    """At least one sample of seq_len + 1 tokens, and token ids the model can embed."""
    need = plan.seq_len + 2
    if len(corpus) < need:
        raise DataError(f"data {corpus.name}: {len(corpus)} tokens, fewer than one sample needs "
                        f"(seq_len + 2 = {need}); use a longer text or a shorter seq_len")
    if vocab is not None:
        low, top = corpus.token_range()
        if top >= vocab or low < 0:
            raise DataError(f"data {corpus.name}: token id {top} is outside the model's "
                            f"vocabulary of {vocab}; give token ids in [0, {vocab})")


def check_checkpoint(config: TrainConfig, plan: Plan, cli: bool) -> None:
    """The checkpoint folder can be written; a checkpoint to resume holds this model."""
    if not config.checkpoint_dir:
        # resume is the default: without a folder there is simply nothing to resume (the CLI
        # refuses an explicit --resume)
        for field in ("checkpoint_every",):
            if getattr(config, field):
                raise ConfigError(f"{option_name(field, cli)} needs "
                                  f"{option_name('checkpoint_dir', cli)}: give the folder")
        return
    check_writable_dir(config.checkpoint_dir, option_name("checkpoint_dir", cli))
    if not config.resume:
        return
    for step in committed_steps(config.checkpoint_dir)[:1]:
        path = step_dir(config.checkpoint_dir, step)
        try:
            held = json.loads((path / META).read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            return  # damaged: the workers skip it for an older one, with a message
        if held != plan.model:
            raise CheckpointError(f"checkpoint {path} holds model {held!r}, the plan trains "
                                  f"{plan.model!r}; pass the same model or another "
                                  f"{option_name('checkpoint_dir', cli)}")


def check_worker_count(plan: Plan) -> None:
    limit = int(os.environ.get("HETRAIN_MAX_LOCAL_WORKERS", MAX_LOCAL_WORKERS))
    n = len(plan.devices())
    if n > limit:
        raise ConfigError(f"the plan uses {n} devices, and a local run spawns one process per "
                          f"device: more than this machine's limit of {limit}; use a smaller "
                          "cluster, run under torchrun across nodes, or raise "
                          "HETRAIN_MAX_LOCAL_WORKERS")


# --- the __main__ guard ----------------------------------------------------------------------
def check_main_guard() -> None:
    """Spawned workers re-import the main script: a training call at its top level, outside
    `if __name__ == "__main__":`, would run again in every worker and kill it."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", "") or ""
    if main is None or not file or spec_name.endswith("__main__"):
        return  # interactive, `python -c`, `python -m pkg`: nothing is re-imported
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and
                                     frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:
        return
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(file).read_text())
    except OSError:
        raise ConfigError(f"{file}: spawned workers re-import the main script, and it cannot be "
                          "read; save the script to a file and run that") from None
    except (SyntaxError, ValueError):
        return
    if not any(_is_main_guard(node) and node.lineno <= line <= (node.end_lineno or line)
               for node in tree.body):
        raise ConfigError(f"{file}:{line}: training is started at the top level of the script; "
                          "spawned workers re-import the script and would start it again. Put "
                          "the call under `if __name__ == \"__main__\":`")


def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    parts = [node.test.left, *node.test.comparators]
    names = {p.id for p in parts if isinstance(p, ast.Name)}
    values = {p.value for p in parts if isinstance(p, ast.Constant)}
    return names == {"__name__"} and values == {"__main__"}


# --- all of it -------------------------------------------------------------------------------
def preflight(cluster: Cluster, plan: Plan, config: TrainConfig, *,
              model: ModelSource | None = None, corpus: Corpus | None = None,
              out_dir: str | Path | None = None, time_scale: float | None = None,
              outputs: Iterable[tuple[str | Path | None, str]] = (), cli: bool = False,
              spawn: bool = True) -> Corpus:
    """Every check that needs no worker; returns the corpus (loaded when not given).
    `outputs`: (path, option) of files the caller will write; `spawn`: workers are spawned
    here (the worker limit and the script guard apply)."""
    check_positive(time_scale, option_name("time_scale", cli))
    check_batch(plan.global_batch, plan.seq_len, cli=False)
    for path, option in outputs:
        check_writable_file(path, option)
    check_writable_dir(out_dir, option_name("out_dir", cli))
    check_checkpoint(config, plan, cli)
    model = (model if model is not None else load_model(plan.model)).units(plan.half_layers)
    check_model(plan, model)
    require_bridge(cluster.bridge_backend, cluster.bridge_plugin)
    if spawn:
        check_worker_count(plan)
        check_main_guard()
        real_devices_by_kind(plan, cluster)  # a `mode: real` kind that cannot run here
    corpus = corpus if corpus is not None else load_corpus(config.data, config.seed)
    check_corpus(corpus, plan, model.vocab_size)
    return corpus

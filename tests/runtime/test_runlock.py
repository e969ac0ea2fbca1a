"""One owner and one run per checkpoint folder: a second run is refused with one line, a rerun
continues the folder's run, another model needs --fresh (which moves the old run aside), a
finished run has nothing to do, and resume/export read only the folder's own run."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from hetrain.errors import CheckpointError
from hetrain.runtime.checkpoint import META, find_latest, run_steps, step_dir
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.runlock import RUN, RunComplete, run_folder
from tests.conftest import EXAMPLES
from tests.runtime.test_safe_load import seal, write_checkpoint

PLAN = SimpleNamespace(model="tiny", global_batch=8, seq_len=16)


def config(root, **kw):
    return TrainConfig(model="tiny", steps=kw.pop("steps", 10), checkpoint_dir=str(root), **kw)


def claimed(root, plan=PLAN, **kw):
    with run_folder(config(root, **kw), plan) as cfg:
        return cfg


def add_checkpoint(root, step, run_id):
    path = write_checkpoint(root, step)
    meta = json.loads((path / META).read_text())
    (path / META).write_text(json.dumps({**meta, "run_id": run_id}))
    seal(path, step)


def test_new_folder_starts_a_run_and_a_rerun_continues_it(tmp_path):
    first = claimed(tmp_path)
    assert first.run_id and not first.resume
    add_checkpoint(tmp_path, 4, first.run_id)
    again = claimed(tmp_path)
    assert (again.run_id, again.resume) == (first.run_id, True)


def test_another_model_needs_fresh_which_moves_the_old_run_aside(tmp_path):
    old = claimed(tmp_path)
    add_checkpoint(tmp_path, 4, old.run_id)
    other = SimpleNamespace(model="small", global_batch=8, seq_len=16)
    with pytest.raises(CheckpointError, match=r"model 'tiny' there, 'small' here.*--fresh"):
        claimed(tmp_path, other)
    new = claimed(tmp_path, other, fresh=True)
    assert new.run_id != old.run_id and not new.resume
    assert run_steps(tmp_path) == [] and find_latest(tmp_path) is None
    assert (tmp_path / f"replaced-{old.run_id}" / "step-000004").is_dir()
    assert json.loads((tmp_path / RUN).read_text())["identity"]["model"] == "small"


def test_no_resume_refuses_a_folder_holding_checkpoints(tmp_path):
    add_checkpoint(tmp_path, 2, claimed(tmp_path).run_id)
    with pytest.raises(CheckpointError, match="--fresh"):
        claimed(tmp_path, resume=False)


def test_finished_run_has_nothing_to_do(tmp_path):
    add_checkpoint(tmp_path, 6, claimed(tmp_path).run_id)
    with pytest.raises(RunComplete, match="already at step 6") as done:
        claimed(tmp_path, steps=6)
    assert done.value.step == 6


def test_checkpoints_of_another_run_are_never_candidates(tmp_path):
    mine = claimed(tmp_path)
    add_checkpoint(tmp_path, 2, mine.run_id)
    add_checkpoint(tmp_path, 8, "someone-else")  # e.g. copied in by hand
    assert run_steps(tmp_path) == [2]
    assert find_latest(tmp_path).path == step_dir(tmp_path, 2)


HOLD = """
import sys, time
from types import SimpleNamespace
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.runlock import run_folder
plan = SimpleNamespace(model="tiny", global_batch=8, seq_len=16)
with run_folder(TrainConfig(checkpoint_dir=sys.argv[1]), plan):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_run_on_one_folder_is_refused_with_one_line(tmp_path):
    from hetrain.cli.main import app

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"in use by another run .process "
                                                  f"{holder.pid}"):
            claimed(tmp_path)
        run = CliRunner().invoke(app, [
            "train", "--cluster", str(EXAMPLES / "clusters" / "three-kinds.yaml"),
            "--checkpoint-dir", str(tmp_path), "--steps", "2", "--global-batch", "8",
            "--seq-len", "16", "--time-scale", "1e-9"])
        assert run.exit_code == 2, run.output
        assert "in use by another run" in run.output
        assert len(run.output.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    assert claimed(tmp_path).run_id  # released with its owner

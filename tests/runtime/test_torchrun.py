"""Under torchrun (one node, three processes, c10d rendezvous) `hetrain train` runs one rank
per process and writes the same checkpoints as the local launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hetrain.plan import load_plan
from hetrain.runtime.checkpoint import committed_steps, read_model, step_dir
from hetrain.runtime.launch import train
from tests.helpers import make_config
from tests.runtime.test_supervision import PIPELINE, THREE_KINDS

pytestmark = pytest.mark.slow


def test_torchrun_standalone_trains_and_checkpoints_like_the_local_launcher(three_kinds,
                                                                             tmp_path):
    plan_file, entry = tmp_path / "plan.yaml", tmp_path / "entry.py"
    plan_file.write_text(PIPELINE)
    entry.write_text("from hetrain.cli.main import main\nmain()\n")
    ckpt = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
         str(entry), "train", "--cluster", str(THREE_KINDS), "--plan", str(plan_file),
         "--steps", "4", "--time-scale", "1e-9", "--checkpoint-dir", str(ckpt),
         "--checkpoint-every", "2", "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert committed_steps(ckpt) == [4, 2]
    assert sorted(p.name for p in (tmp_path / "out").glob("rank*.pt")) == \
        ["rank0.pt", "rank1.pt", "rank2.pt"]
    # The same plan from the local launcher, on the CLI's data (the default corpus).
    local = train(three_kinds, load_plan(plan_file, three_kinds),
                  make_config("tiny", 4, precision="float32"), time_scale=1e-9)
    params, meta = read_model(step_dir(ckpt, 4))
    assert meta["step"] == 4 and set(params) == set(local.params)
    for name, value in local.params.items():
        torch.testing.assert_close(params[name], value, msg=lambda m, n=name: f"{n}: {m}")

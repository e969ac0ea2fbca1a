"""`hetrain data prepare` then `hetrain train --data FILE`: training reads the token file (the
losses of one-process training on it), and the run folder holds TensorBoard event files that
tensorboard's own reader loads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.data.loading import load_corpus
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.recipe import lr_at
from hetrain.runtime.reference import train_reference
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow

RECIPE = ["--lr", "3e-3", "--warmup-steps", "1", "--lr-schedule", "cosine", "--min-lr", "1e-4",
          "--grad-clip", "2.5", "--weight-decay", "0.1"]


def test_prepare_train_and_read_the_events(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as accumulator
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    data = tmp_path / "train.bin"
    runner = CliRunner()
    prep = runner.invoke(app, ["data", "prepare", str(text), "--out", str(data),
                               "--train-vocab", "256"])
    assert prep.exit_code == 0, prep.output
    out, summary = tmp_path / "run", tmp_path / "run.json"
    result = runner.invoke(app, ["train", "--cluster", str(EXAMPLES / "clusters" /
                                                          "three-kinds.yaml"),
                                 "--data", str(data), "--steps", "3", "--global-batch", "24",
                                 "--seq-len", "16", "--no-search", "--time-scale", "1e-9", *RECIPE,
                                 "--out-dir", str(out), "--json", str(summary)])
    assert result.exit_code == 0, result.output
    figures = json.loads(summary.read_text())
    losses, kinds = figures["losses"], set(figures["per_kind"])
    assert len(figures["grad_norm"]) == 3 and figures["lr"][0] == pytest.approx(3e-3)
    config = TrainConfig(steps=3, lr=3e-3, warmup_steps=1, lr_schedule="cosine", min_lr=1e-4,
                         grad_clip=2.5, weight_decay=0.1)
    _, ref = train_reference(config, load_corpus(data), 24, 16)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-4, atol=1e-5)

    acc = accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= tags
    assert len(kinds) >= 2 and {f"busy/{k}" for k in kinds} | {f"mfu/{k}" for k in kinds} <= tags
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}
    assert [s for s, _ in scalars["train/loss"]] == [0, 1, 2]
    torch.testing.assert_close(torch.tensor([v for _, v in scalars["train/loss"]]),
                               torch.tensor(losses, dtype=torch.float32))
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(
        [lr_at(config, s) for s in range(3)], rel=1e-6)
    assert all(v > 0 for _, v in scalars["train/grad_norm"] + scalars["train/tokens_per_s"])
    assert all(0 <= v <= 1 for k in kinds for _, v in scalars[f"busy/{k}"])

"""`hetrain bench tax`: hetrain and plain DDP train the same thing on two real CPU workers."""

from __future__ import annotations

import pytest

from hetrain.cli.bench_tax import bench_tax

pytestmark = pytest.mark.slow


def test_bench_tax_compares_the_same_training_under_hetrain_and_ddp():
    out = bench_tax("tiny", global_batch=4, seq_len=16, steps=2, rounds=1)
    # Same model, samples and optimizer: the two runs end on the same loss.
    assert out["final_loss"]["hetrain"] == pytest.approx(out["final_loss"]["ddp"], rel=1e-5)
    assert out["mode"] == "real" and not out["emulated"]
    ratio = out["hetrain_step_s"]["median"] / out["ddp_step_s"]["median"]
    assert out["tax_pct"] == pytest.approx(100 * (ratio - 1))
    assert len(out["tax_pct_per_round"]) == 1

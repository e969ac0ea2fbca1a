"""The simulator times what the runtime does: a late receive waits for the rendezvous (the
ready notice, then the bytes), and gradient buckets start in the
global bucket order, each as soon as its holders have their gradients."""

from __future__ import annotations

import pytest

from hetrain.plan import Plan
from hetrain.sim import simulate_plan

from .helpers import SEQ_LEN, FixedCost, line_cluster, pipeline_plan


def _starts(result, name: str, lane: str) -> list[float]:
    return [e.start_s for e in result.events if e.name == name and e.lane == lane]


def test_a_receiver_posted_first_waits_for_the_transfer_only():
    cluster = line_cluster(2)
    c = 0.25
    result = simulate_plan(pipeline_plan(cluster, 2, 2), cluster, FixedCost(cluster, p2p=c))
    # stage 1 waits from 0 for F0, sent at 1
    assert _starts(result, "F0", "n1:0") == pytest.approx([1 + c])


def test_a_late_receiver_pays_the_handshake_and_the_transfer():
    cluster = line_cluster(2)
    c = 1.5
    result = simulate_plan(pipeline_plan(cluster, 2, 2), cluster, FixedCost(cluster, p2p=c))
    # stage 1 posts F0's receive at 0: the notice (a message of no bytes: c here) reaches
    # stage 0 at c, after its send (at 1), so the bytes arrive at 2c. It runs F0, then B0
    # (2c+1 .. 2c+3), posting F1's receive as B0 starts, after stage 0 sent it (at 2): the
    # notice and the bytes follow the post, longer than B0 when c > 1
    assert _starts(result, "F0", "n1:0") == pytest.approx([2 * c])
    assert _starts(result, "F1", "n1:0") == pytest.approx([(2 * c + 1) + 2 * c])


def test_a_receive_posted_an_action_ahead_hides_the_transfer():
    cluster = line_cluster(2)
    c = 0.25
    result = simulate_plan(pipeline_plan(cluster, 2, 2), cluster, FixedCost(cluster, p2p=c))
    # the same, but handshake and bytes (2+3c) end before B0 does (4+c)
    assert _starts(result, "F1", "n1:0") == pytest.approx([4 + c])


def test_free_transfers_leave_late_receivers_unaffected():
    cluster = line_cluster(2)
    result = simulate_plan(pipeline_plan(cluster, 2, 2), cluster, FixedCost(cluster))
    assert _starts(result, "F1", "n1:0") == pytest.approx([4.0])


def test_buckets_start_as_soon_as_their_holders_are_ready():
    """Group c holds every layer; a holds the first half, b the second. The {b, c} bucket
    (higher layers) comes first in the global order and starts when b is done, under a's
    last backward; the {a, c} bucket waits for a only."""
    cluster = line_cluster(3)
    plan = Plan.model_validate({
        "model": "tiny", "seq_len": SEQ_LEN, "global_batch": 3,
        "stage_groups": [
            {"name": "a", "kind": "H100", "devices": ["n0:0"], "layers": [0, 3]},
            {"name": "b", "kind": "H100", "devices": ["n1:0"], "layers": [3, 6]},
            {"name": "c", "kind": "H100", "devices": ["n2:0"], "layers": [0, 6]},
        ],
        "routes": [{"stages": ["a", "b"], "micro_batches": 2, "micro_batch_size": 1},
                   {"stages": ["c"], "micro_batches": 1, "micro_batch_size": 1}],
    })
    sync = 0.5
    result = simulate_plan(plan, cluster, FixedCost(cluster, sync=sync))
    # a: F0 F1 .. B0 (4-6), B1 (7-9); b ends at 7; c at 3
    first = [e for e in result.events if e.name == "allreduce" and e.args["layers"][0] == 0]
    second = [e for e in result.events if e.name == "allreduce" and e.args["layers"][0] == 3]
    assert first and [e.start_s for e in first] == pytest.approx([9.0] * len(first))
    assert second and [e.start_s for e in second] == pytest.approx([7.0] * len(second))
    assert result.step_s == pytest.approx(9.0 + sync)

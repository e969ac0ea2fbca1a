"""Emulated links: the pacer's release times follow the simulator's rule; P2P messages carry
their send time."""

from __future__ import annotations

import pytest
import torch

from hetrain.cluster import cluster_from_dict
from hetrain.comm.p2p import pack, unpack
from hetrain.comm.pacing import LinkPacer
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec

CLUSTER = cluster_from_dict({
    "nodes": [{"name": "h", "kind": "H100", "count": 2}, {"name": "a", "kind": "A100-80GB",
                                                           "count": 1},
              {"name": "c", "kind": "cpu", "count": 2}],
    "links": {"inter_node_gbps": 0.5, "inter_node_latency_us": 100}})
COST = CostModel(CLUSTER, model_spec(model_config("tiny"), 16))


def pacer(scale: float = 10.0) -> LinkPacer:
    return LinkPacer(CLUSTER, COST, scale, emulated_kinds={"H100", "A100-80GB"})


def test_release_follows_the_simulator_rule():
    p, nbytes = pacer(), 1e6
    transfer_s = 10.0 * COST.p2p_s("h:0", "a:0", nbytes)
    handshake_s = 10.0 * COST.p2p_handshake_s("h:0", "a:0")
    assert transfer_s > 10 * handshake_s > 0  # a slow link: bytes dominate the latency
    # Receive posted long before the send: the bytes start when sent.
    assert p.p2p_release_s("h:0", "a:0", nbytes, 100.0, 50.0) == pytest.approx(100 + transfer_s)
    # Receive posted after the send: the ready notice must reach the sender first.
    assert p.p2p_release_s("h:0", "a:0", nbytes, 100.0, 120.0) == \
        pytest.approx(120 + handshake_s + transfer_s)
    # The time scale stretches every duration alike.
    slow = pacer(30.0).p2p_release_s("h:0", "a:0", nbytes, 100.0, 50.0) - 100
    assert slow == pytest.approx(3 * transfer_s)


def test_only_emulated_links_are_paced():
    p = pacer()
    assert p.paces("h:0", "c:0") and p.paces("c:0", "a:0") and not p.paces("c:0", "c:1")
    assert p.p2p_release_s("c:0", "c:1", 1e6, 100.0, 50.0) == 0.0
    assert not p.paces("h:0", "h:0")
    # Inside a node the link is faster than across nodes.
    intra = p.p2p_release_s("h:0", "h:1", 1e6, 0.0, 0.0)
    assert 0 < intra < p.p2p_release_s("h:0", "a:0", 1e6, 0.0, 0.0)


def test_collectives_are_priced_by_the_cost_model():
    p = pacer()
    assert p.collective_s(["h:0", "a:0"], 4e6) == pytest.approx(
        10.0 * COST.sync_s(["h:0", "a:0"], 4e6))
    assert p.collective_s(["c:0", "c:1"], 4e6) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_message_carries_its_send_time(dtype):
    x = torch.randn(2, 3, 5).to(dtype)
    buf = pack(x, 1_790_000_000.123456)
    back, sent = unpack(buf, (2, 3, 5), dtype)
    assert sent == 1_790_000_000.123456  # float64: microseconds survive
    assert torch.equal(back, x) and back.dtype == dtype

"""Placing torchrun's processes on a plan (no processes started): each agent's processes take
its hosts' plan devices in plan order; after an elastic restart without some hosts, the plan
is the survivors' one; a mismatch names the agent and the fix."""

from __future__ import annotations

import pytest

from hetrain.cluster.loading import load_cluster
from hetrain.errors import RuntimeFailure
from hetrain.plan import expand_plan
from hetrain.planner.replan import data_parallel_replan
from hetrain.runtime.config import TrainConfig
from hetrain.runtime.torchrun import (
    NODES_ENV,
    UNSHARED_STORE,
    Proc,
    agent_nodes,
    check_restartable,
    rank_layout,
)
from tests.conftest import EXAMPLES

CONFIG = TrainConfig(model="tiny", steps=1)


@pytest.fixture
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "two-hosts.yaml")


@pytest.fixture
def plan(cluster):
    return expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "pipelines": [
        {"micro_batches": 2, "stages": [{"devices": ["host-a:0"], "layers": [0, 3]},
                                        {"devices": ["host-b:0"], "layers": [3, 6]}]},
        {"micro_batches": 1, "stages": [{"devices": ["host-a:1"], "layers": [0, 6]}]},
    ]}, cluster)


def procs(*agents):
    """torchrun's ranks: agent by agent (in rendezvous order), local ranks in order."""
    return [Proc(tuple(nodes), i, n, 0) for nodes, n in agents for i in range(n)]


def test_ranks_follow_the_plan_whatever_order_the_agents_joined(cluster, plan):
    assert plan.devices() == ["host-a:0", "host-b:0", "host-a:1"]
    first_a = rank_layout(cluster, plan, CONFIG, procs((["host-a"], 2), (["host-b"], 1)), None)
    assert first_a.plan_rank == [0, 2, 1] and first_a.plan == plan and not first_a.replanned
    first_b = rank_layout(cluster, plan, CONFIG, procs((["host-b"], 1), (["host-a"], 2)), None)
    assert first_b.plan_rank == [1, 0, 2]


def test_survivors_get_the_replanned_plan(cluster, plan):
    seen = {}

    def replan(survivors, old, config):
        seen["devices"] = [d.id for d in survivors.devices]
        return data_parallel_replan()(survivors, old, config)

    layout = rank_layout(cluster, plan, CONFIG, procs((["host-a"], 2)), replan)
    assert seen["devices"] == ["host-a:0", "host-a:1"]
    assert layout.replanned and layout.plan.global_batch == plan.global_batch
    # Processes the survivors' plan leaves without a device idle (None); the others number it.
    used = [r for r in layout.plan_rank if r is not None]
    assert sorted(used) == list(range(len(layout.plan.devices())))
    assert "host-b:0" not in layout.cluster.device_by_id
    with pytest.raises(RuntimeFailure, match="no torchrun agent holds"):
        rank_layout(cluster, plan, CONFIG, procs((["host-a"], 2)), None)


def test_a_process_count_off_the_plan_names_the_agent_and_the_fix(cluster, plan):
    with pytest.raises(RuntimeFailure, match="holding host-a started 1 processes but the plan "
                       "has 2 devices there; pass --nproc-per-node 2"):
        rank_layout(cluster, plan, CONFIG, procs((["host-a"], 1), (["host-b"], 1)), None)
    with pytest.raises(RuntimeFailure, match="node host-a is held by two torchrun agents"):
        rank_layout(cluster, plan, CONFIG, procs((["host-a"], 2), (["host-a", "host-b"], 1)),
                    None)


def test_agent_nodes_from_the_environment_or_the_group_rank(cluster, plan, monkeypatch):
    monkeypatch.setenv(NODES_ENV, "host-b")
    assert agent_nodes(cluster, plan, 0, 2) == ("host-b",)
    monkeypatch.setenv(NODES_ENV, "host-c")
    with pytest.raises(RuntimeFailure, match="no node host-c"):
        agent_nodes(cluster, plan, 0, 2)
    monkeypatch.delenv(NODES_ENV)
    assert agent_nodes(cluster, plan, 0, 1) == ("host-a", "host-b")  # one agent holds all
    assert agent_nodes(cluster, plan, 1, 2) == ("host-b",)
    with pytest.raises(RuntimeFailure, match="set HETRAIN_NODES"):
        agent_nodes(cluster, plan, 0, 3)


def test_restarts_on_torchrun_shared_store_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(RuntimeFailure, match=f"set {UNSHARED_STORE}=1"):
        check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the agents were told
    check_restartable()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: the store is harmless
    check_restartable()

"""Which backend carries each transfer (the kind's own inside a kind, the bridge between
kinds), the bridge backend a cluster names, and its refusal before any worker starts."""

from __future__ import annotations

import pytest
import torch

from hetrain.cluster import cluster_from_dict
from hetrain.comm.bridge import (
    HostStager,
    bridge_problem,
    on_device,
    pair_backend,
    pair_groups,
    pinned_empty,
    require_bridge,
)
from hetrain.errors import ClusterError
from tests.refusals import cli_refused

NATIVE = {"H100": "nccl", "A100": "nccl", "Ascend910B": "hccl", "emulated-V100": "gloo"}


def test_devices_of_one_kind_talk_on_the_kinds_own_backend():
    assert pair_backend("H100", "H100", NATIVE, "gloo") == "nccl"
    assert pair_backend("Ascend910B", "Ascend910B", NATIVE, "gloo") == "hccl"
    assert on_device("nccl") and on_device("hccl")


def test_kinds_cross_the_bridge_and_emulated_kinds_stay_on_the_host():
    assert pair_backend("H100", "A100", NATIVE, "gloo") == "gloo"  # NCCL to NCCL, other kind
    assert pair_backend("H100", "Ascend910B", NATIVE, "mpi") == "mpi"  # the bridge named
    assert pair_backend("emulated-V100", "emulated-V100", NATIVE, "gloo") == "gloo"
    assert not on_device("gloo") and not on_device("mpi")


class _Cache:
    """comm.groups.GroupCache's interface: records the groups asked for, in order."""

    def __init__(self):
        self.asked: list[tuple[tuple[int, ...], str]] = []

    def get(self, ranks, backend):
        self.asked.append((tuple(ranks), backend))
        return f"group{tuple(ranks)}/{backend}"


def test_pair_groups_make_one_group_per_non_default_pair_in_one_order_on_every_rank():
    kind_of = {0: "H100", 1: "H100", 2: "A100", 3: "Ascend910B"}
    pairs = [(0, 1), (1, 0), (1, 2), (2, 3), (3, 2)]
    routes = {}
    caches = []
    for me in range(4):
        cache = _Cache()
        routes[me] = pair_groups(pairs, kind_of, NATIVE, "gloo", cache, me)
        caches.append(cache.asked)
    assert all(asked == caches[0] for asked in caches)  # the same groups, the same order
    assert caches[0] == [((0, 1), "nccl")]  # gloo pairs ride the default group
    assert routes[0] == {1: ("group(0, 1)/nccl", "nccl")}
    assert routes[1][2] == (None, "gloo") and routes[3] == {2: (None, "gloo")}


def test_the_default_bridge_is_gloo_and_a_cluster_can_name_another():
    nodes = [{"name": "a", "kind": "H100"}, {"name": "b", "kind": "A100-80GB"}]
    assert cluster_from_dict({"nodes": nodes}).bridge_backend == "gloo"
    named = cluster_from_dict({"nodes": nodes, "bridge_backend": "mpi",
                               "bridge_plugin": "my_bridge"})
    assert (named.bridge_backend, named.bridge_plugin) == ("mpi", "my_bridge")


def test_a_missing_bridge_backend_or_plugin_is_refused_in_one_line():
    assert bridge_problem("gloo") is None
    require_bridge("gloo")
    with pytest.raises(ClusterError, match="bridge_backend 'no-such-backend' is not available"
                       ) as err:
        require_bridge("no-such-backend")
    assert "no backend 'no-such-backend' registered" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ClusterError, match="plugin 'no_such_bridge_plugin' is not installed"):
        require_bridge("gloo", "no_such_bridge_plugin")


def test_train_refuses_an_unavailable_bridge_before_spawning(sandbox):
    path = sandbox.work / "c.yaml"
    path.write_text("nodes:\n  - {name: a, kind: H100}\n  - {name: b, kind: A100-80GB}\n"
                    "bridge_backend: no-such-backend\n")
    cli_refused(sandbox, ["train", "--cluster", str(path), "--steps", "1", "--global-batch",
                          "4", "--seq-len", "16", "--time-scale", "1e-9"],
                "bridge_backend 'no-such-backend'")


def test_host_staging_on_the_cpu_copies_without_pinning():
    stager = HostStager(torch.device("cpu"))
    t = torch.arange(6, dtype=torch.float32)
    out = torch.empty(6)
    assert stager.to_host(t, out=out) is out and torch.equal(out, t)
    back = stager.to_device(out)
    assert torch.equal(back, t) and back.data_ptr() != out.data_ptr()  # a private copy
    buf = pinned_empty(16, torch.device("cpu"))
    assert buf.numel() == 16 and not buf.is_pinned()

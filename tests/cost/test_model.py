"""CostModel's memory of a stage that runs one whole backward a step: its activations and
gradients together lie between the activation phase alone and it plus every gradient."""

from __future__ import annotations

import itertools

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.cost.model import UNMODELLED_FRACTION
from hetrain.model import model_config, model_spec
from hetrain.plan import StageGroup

CLUSTER = cluster_from_dict({"nodes": [{"name": "h", "kind": "H100", "count": 2}]})


@pytest.mark.parametrize(("tp", "dtype", "mbs"), [(1, "fp32", 1), (1, "bf16", 8), (2, "bf16", 2)])
def test_one_backward_holds_each_layer_between_its_activations_and_its_gradients(tp, dtype, mbs):
    cost = CostModel(CLUSTER, model_spec(model_config("small"), 64))
    for (a, b), recompute in itertools.product(
            itertools.combinations(range(cost.spec.n_layers + 1), 2), (False, True)):
        g = StageGroup(name="g", kind="H100", devices=[f"x{i}" for i in range(tp)],
                       layers=(a, b), dtype=dtype, recompute=recompute)
        acts = cost.activation_bytes_peak(g, mbs, 1)
        one = cost.one_backward_bytes_peak(g, mbs)
        # at its last layer it holds the whole forward's activations and that layer's grads
        assert acts < one <= acts + cost.gradient_bytes(g)
        # the gradients leave the activation phase, not the gradient-sync phase
        several = cost.stage_memory_bytes(g, mbs, 1)
        single = cost.stage_memory_bytes(g, mbs, 1, single_backward=True)
        grads = cost.gradient_bytes(g) * (1 + UNMODELLED_FRACTION)
        assert several - grads <= single <= several

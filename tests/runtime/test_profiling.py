"""Tensor-parallel profile entries are timed on a real tp-way group (gloo on CPU here)."""

from __future__ import annotations

import pytest

from hetrain.errors import CostError
from hetrain.model import model_config, model_spec
from hetrain.runtime.profiling import measure_tp_entries, tp_devices


def test_a_tp_group_is_timed_layer_by_layer():
    cfg = model_config("tiny")
    entries = measure_tp_entries(cfg, tp_devices(["cpu"], 2), "gloo", "fp32", seq_len=16,
                                 micro_batch_sizes=[1, 2], repeats=1, timeout_s=300)
    n = model_spec(cfg, 16).n_layers
    assert [(e.tp, e.micro_batch_size) for e in entries] == [(2, 1), (2, 2)]
    for e in entries:
        assert len(e.forward_s_per_token) == len(e.backward_s_per_token) == n
        assert all(x > 0 for x in e.forward_s_per_token + e.backward_s_per_token)


def test_a_degree_without_the_devices_is_refused():
    assert tp_devices(["cuda:0", "cuda:1", "cuda:2"], 2) == ["cuda:0", "cuda:1"]
    with pytest.raises(CostError, match="tp 4 needs 4 devices"):
        tp_devices(["cuda:0", "cuda:1"], 4)

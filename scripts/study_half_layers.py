"""Study: would partition units finer than a decoder layer take the imbalance out of a plan?

Cuts every block of the reference decoder's spec into two partition units, the attention half
(its norm, q/k/v/o, attention) and the MLP half (its norm, w1/w2/w3), each with its share of
parameters, FLOPs and kept activations (they add up to the block's), and plans the cluster
with whole layers and with halves. Prints step, bubble share, imbalance share and search time
for both.

    python scripts/study_half_layers.py examples/clusters/mixed-1280.yaml --global-batch 2048

A study, not part of hetrain: the runtime builds stages of whole layers.
"""

from __future__ import annotations

import json
import time

from study_common import planning_args

from hetrain.cost.model import CostModel
from hetrain.model import model_spec
from hetrain.model.config import ModelConfig
from hetrain.model.spec import LayerSpec, ModelSpec
from hetrain.planner.search import SearchOptions, search_plan


def halved(cfg: ModelConfig, seq_len: int) -> ModelSpec:
    spec = model_spec(cfg, seq_len)
    h, f, kv = cfg.dim, cfg.ffn_dim, cfg.kv_heads * cfg.head_dim
    q = cfg.n_heads * cfg.head_dim
    kv_kept = q if cfg.n_heads != cfg.kv_heads else kv
    attn_params, mlp_params = 2 * h * q + 2 * h * kv + h, 3 * h * f + h
    norm = 2 * h + 1
    units = [spec.layers[0]]
    for i, block in enumerate(spec.layers[1:-1]):
        common = dict(recompute_elems_per_token=h, output_elems_per_token=h, tp_allreduces=1,
                      tp_replicated_params=h, tp_replicated_elems_per_token=norm + h,
                      sp_replicated_elems_per_token=h, sp_gathered_elems_per_token=h)
        attn = LayerSpec(name=f"block.{i}.attn", params=attn_params,
                         forward_flops_per_token=2 * (attn_params - h) + 2 * q * seq_len,
                         activation_elems_per_token=norm + h + 2 * q + 2 * kv_kept + cfg.n_heads,
                         backward_peak_elems_per_token=2 * (h + q),
                         kv_elems_per_token=2 * kv, attention_kv_elems_per_token=2 * kv_kept,
                         buffer_bytes=block.buffer_bytes, **common)
        mlp = LayerSpec(name=f"block.{i}.mlp", params=mlp_params,
                        forward_flops_per_token=2 * (mlp_params - h),
                        activation_elems_per_token=norm + h + 4 * f,
                        backward_peak_elems_per_token=2 * (h + f), **common)
        assert attn.params + mlp.params == block.params
        assert attn.activation_elems_per_token + mlp.activation_elems_per_token \
            == block.activation_elems_per_token
        units += [attn, mlp]
    units.append(spec.layers[-1])
    return spec.model_copy(update={"layers": units})


def main() -> None:
    args, cluster, cfg = planning_args(__doc__)
    for label, spec in (("whole layers", model_spec(cfg, args.seq_len)),
                        ("halves", halved(cfg, args.seq_len))):
        start = time.perf_counter()
        found = search_plan(cluster, CostModel(cluster, spec), args.global_batch,
                            SearchOptions())
        est = found.estimate
        print(json.dumps({"units": label, "n_units": spec.n_layers,
                          "seq_chunks": found.plan.seq_chunks, "step_s": round(est.step_s, 3),
                          "bubble_share": round(est.bubble_share, 4),
                          "imbalance_share": round(est.imbalance_share, 4),
                          "search_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()

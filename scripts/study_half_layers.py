"""Study: half layers searched from the start against the planner's way of trying them.

hetrain cuts stages between a block's attention and MLP halves (Plan.half_layers): the
search runs over whole layers, then partitions the answer's micro-batch size again over half
layers (planner/search.py: _in_halves). This study plans a cluster three ways and prints
step, bubble share, imbalance share and search time of each: whole layers only, the
planner's way, and a search over half layers from the start (every shape partitioned over
2 n_blocks + 2 units).

    python scripts/study_half_layers.py examples/clusters/mixed-1280.yaml --global-batch 2048
"""

from __future__ import annotations

import json
import time

from study_common import planning_args

from hetrain.cost.model import CostModel
from hetrain.model import model_spec
from hetrain.planner.search import SearchOptions, search_plan


def main() -> None:
    args, cluster, cfg = planning_args(__doc__)
    whole = model_spec(cfg, args.seq_len)
    for label, spec, halves in (("whole layers", whole, False),
                                ("whole, then half layers", whole, True),
                                ("half layers from the start", whole.halves, False)):
        start = time.perf_counter()
        found = search_plan(cluster, CostModel(cluster, spec), args.global_batch,
                            SearchOptions(half_layers=halves))
        est = found.estimate
        print(json.dumps({"search": label, "half_layers": found.plan.half_layers,
                          "seq_chunks": found.plan.seq_chunks, "step_s": round(est.step_s, 3),
                          "bubble_share": round(est.bubble_share, 4),
                          "imbalance_share": round(est.imbalance_share, 4),
                          "search_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()

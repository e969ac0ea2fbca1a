"""Why no plan fits: the first of the memory bounds the request breaks, as one actionable line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import DTYPE_BYTES, CostModel

if TYPE_CHECKING:
    from hetrain.planner.options import SearchOptions

GIB = 1024**3


def state_bytes_per_param(dtype: str) -> int:
    """Weights, gradients, fp32 master copy (for 16-bit dtypes) and two Adam moments."""
    wbytes = DTYPE_BYTES[dtype]
    return wbytes + wbytes + (4 if wbytes < 4 else 0) + 8


def explain_infeasible(cluster: Cluster, cost: CostModel, global_batch: int,
                       options: SearchOptions) -> str:
    from hetrain.planner.options import kind_dtypes, plan_kinds

    spec = cost.spec
    counts = plan_kinds(cluster, options)
    dtypes = kind_dtypes(cluster, list(counts), options.dtype)
    have = sum(cluster.kinds[k].memory_bytes * n for k, n in counts.items())
    per_param = min(state_bytes_per_param(d) for d in dtypes.values())
    need = spec.params * per_param
    where = f"the {', '.join(counts)} devices have" if options.kinds else "the cluster has"
    if need > have:
        return (f"{spec.name} needs {need / GIB:.0f} GiB for weights and optimizer states, "
                f"{where} {have / GIB:.0f} GiB; add devices or use a smaller model "
                "(ZeRO-style sharding of optimizer states is not planned yet)")
    if not any(global_batch % m == 0 for m in options.micro_batch_sizes):
        return (f"global batch {global_batch} is not a multiple of any micro-batch size "
                f"({', '.join(map(str, options.micro_batch_sizes))}); pick another")
    # the largest layer alone, on the roomiest device, split as far as tp allows
    biggest = max(range(spec.n_layers), key=lambda i: spec.layers[i].params)
    layer = spec.layers[biggest]
    room = max(cluster.kinds[k].memory_bytes * max(t for t in options.tp_sizes
                                                   if t <= _largest_node(cluster, k))
               for k in counts)
    layer_need = layer.params * per_param
    if layer_need > room:
        return (f"layer {layer.name} alone needs {layer_need / GIB:.1f} GiB of states, more "
                f"than any tensor-parallel group here holds ({room / GIB:.0f} GiB); use a "
                "smaller model or larger devices")
    return (f"no memory-feasible plan: the states fit ({need / GIB:.0f} of {have / GIB:.0f} GiB) "
            f"but not with the activations of {spec.seq_len}-token sequences in flight under "
            "1F1B, even with recomputation; try a shorter --seq-len or more devices")


def _largest_node(cluster: Cluster, kind: str) -> int:
    return max(n.count for n in cluster.nodes if n.kind == kind)

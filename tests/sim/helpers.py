"""Fixed-duration cost models and small clusters for hand-computable simulations."""

from __future__ import annotations

from hetrain.cluster import Cluster, cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.plan import Plan, expand_plan

SEQ_LEN = 64


class FixedCost(CostModel):
    """Every forward takes `f` and backward `b` seconds per sample; every transfer `p2p`,
    every all-reduce of two or more devices `sync`, every optimizer step `opt`."""

    def __init__(self, cluster: Cluster, *, f: float = 1.0, b: float = 2.0, p2p: float = 0.0,
                 sync: float = 0.0, opt: float = 0.0, model: str = "tiny"):
        super().__init__(cluster, model_spec(model_config(model), SEQ_LEN))
        self.f, self.b, self.p2p, self.sync, self.opt = f, b, p2p, sync, opt

    def stage_compute_s(self, group, op, samples, seq_len):
        return (self.f if op == "forward" else self.b) * samples

    def p2p_s(self, src_device, dst_device, nbytes):
        return self.p2p

    def sync_s(self, devices, nbytes):
        return self.sync if len(devices) > 1 and nbytes > 0 else 0.0

    def optimizer_s(self, kind, params):
        return self.opt


class FreeComm(CostModel):
    """The roofline cost model with free transfers, syncs and optimizer: compute only."""

    def p2p_s(self, src_device, dst_device, nbytes):
        return 0.0

    def sync_s(self, devices, nbytes):
        return 0.0

    def optimizer_s(self, kind, params):
        return 0.0


def line_cluster(nodes: int, per_node: int = 1, latency_us: float = 0.0) -> Cluster:
    """`nodes` nodes of `per_node` H100s each: nodes n0, n1, ...; devices "n0:0", "n0:1", ..."""
    return cluster_from_dict({
        "name": "line",
        "nodes": [{"name": f"n{i}", "kind": "H100", "count": per_node} for i in range(nodes)],
        "links": {"inter_node_latency_us": latency_us, "intra_node_latency_us": latency_us},
    })


def pipeline_plan(cluster: Cluster, stages: int, micro_batches: int, pipelines: int = 1,
                  model: str = "tiny", devices: list[list[str]] | None = None) -> Plan:
    """`pipelines` pipelines of `stages` stages splitting the model's layers evenly."""
    n_layers = model_spec(model_config(model), SEQ_LEN).n_layers
    bounds = [round(i * n_layers / stages) for i in range(stages + 1)]
    pipes = []
    for p in range(pipelines):
        spec = []
        for s in range(stages):
            stage = {"layers": [bounds[s], bounds[s + 1]]}
            stage.update({"devices": [devices[p][s]]} if devices else {"kind": "H100"})
            spec.append(stage)
        pipes.append({"micro_batches": micro_batches, "stages": spec})
    return expand_plan({"model": model, "seq_len": SEQ_LEN, "pipelines": pipes}, cluster)

"""What the planning studies share: their command line (a cluster, the model, the global
batch and the sequence length), with the cluster loaded and the model's config."""

from __future__ import annotations

import argparse

from hetrain.cluster import load_cluster
from hetrain.cluster.topology import Cluster
from hetrain.model import model_config
from hetrain.model.config import ModelConfig


def planning_args(doc: str | None) -> tuple[argparse.Namespace, Cluster, ModelConfig]:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("cluster")
    parser.add_argument("--model", default="llama-70b")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    return args, load_cluster(args.cluster), model_config(args.model)

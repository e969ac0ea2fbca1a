"""Communication across kinds: process groups, hierarchical all-reduce, staged P2P."""

from hetrain.comm.allreduce import HierarchicalAllReduce, all_reduce_tensors, bucketed
from hetrain.comm.groups import GroupCache, torch_backend
from hetrain.comm.p2p import P2P, tag_of

__all__ = ["P2P", "GroupCache", "HierarchicalAllReduce", "all_reduce_tensors", "bucketed",
           "tag_of", "torch_backend"]

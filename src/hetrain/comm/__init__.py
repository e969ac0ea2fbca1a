"""Communication across kinds: process groups, sharded sums, overlap thread, staged P2P."""

from hetrain.comm.groups import GroupCache, torch_backend
from hetrain.comm.overlap import CommThread
from hetrain.comm.p2p import P2P, tag_of
from hetrain.comm.sharded import FlatLayout, ShardedSum

__all__ = ["P2P", "CommThread", "FlatLayout", "GroupCache", "ShardedSum", "tag_of",
           "torch_backend"]

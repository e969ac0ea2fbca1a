"""Cluster description: device kinds, devices, nodes, links; YAML loading; local discovery."""

from hetrain.cluster.kinds import CATALOG, DeviceKind
from hetrain.cluster.loading import cluster_from_dict, load_cluster
from hetrain.cluster.topology import Cluster, Device, Links, Node

__all__ = ["CATALOG", "Cluster", "Device", "DeviceKind", "Links", "Node", "cluster_from_dict",
           "load_cluster"]

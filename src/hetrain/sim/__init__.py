"""Simulator: discrete-event execution of a plan's step (1F1B, P2P, gradient sync, optimizer).

The Gantt drawing lives in hetrain.sim.gantt (it imports matplotlib, so it is not loaded here).
"""

from hetrain.sim.result import DeviceTime, SimResult
from hetrain.sim.simulate import simulate_plan
from hetrain.sim.sync import SyncSet, sync_sets

__all__ = ["DeviceTime", "SimResult", "SyncSet", "simulate_plan", "sync_sets"]

"""Simulator: discrete-event execution of a plan's step (1F1B or zero-bubble, P2P,
overlapped gradient sync, optimizer).

The Gantt drawing lives in hetrain.sim.gantt (it imports matplotlib, so it is not loaded here).
"""

from hetrain.sim.result import DeviceTime, SimResult
from hetrain.sim.simulate import simulate_plan

__all__ = ["DeviceTime", "SimResult", "simulate_plan"]

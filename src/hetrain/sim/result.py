"""What a simulated step reports: its time, throughput, and where each device's time went.

A device's step splits into busy (forward, backward, optimizer) and idle; idle splits into
waiting on communication (a transfer or sync it needs is in flight) and bubble (waiting for
other stages to compute: pipeline fill and drain, load imbalance, the end of the step). The
bubble's imbalance part is what no schedule can fill (plan.schedule.imbalance_s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetrain.trace import TraceEvent


@dataclass(frozen=True)
class DeviceTime:
    device: str
    kind: str
    group: str
    step_s: float
    busy_s: float
    comm_wait_s: float
    imbalance_s: float = 0.0  # of bubble_s: no order of actions fills it

    @property
    def imbalance_share(self) -> float:
        return self._share(self.imbalance_s)

    @property
    def idle_s(self) -> float:
        return max(0.0, self.step_s - self.busy_s)

    @property
    def bubble_s(self) -> float:
        return max(0.0, self.idle_s - self.comm_wait_s)

    def _share(self, seconds: float) -> float:
        return seconds / self.step_s if self.step_s > 0 else 0.0

    @property
    def busy_share(self) -> float:
        return self._share(self.busy_s)

    @property
    def idle_share(self) -> float:
        return self._share(self.idle_s)

    @property
    def bubble_share(self) -> float:
        return self._share(self.bubble_s)

    @property
    def comm_wait_share(self) -> float:
        return self._share(self.comm_wait_s)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "group": self.group, "busy_s": self.busy_s,
                "idle_s": self.idle_s, "bubble_s": self.bubble_s,
                "comm_wait_s": self.comm_wait_s, "imbalance_s": self.imbalance_s,
                "busy_share": self.busy_share, "idle_share": self.idle_share,
                "bubble_share": self.bubble_share, "imbalance_share": self.imbalance_share,
                "comm_wait_share": self.comm_wait_share}


@dataclass
class SimResult:
    """One simulated step. `exposed_comm_s` is how much longer the step is than the same
    schedule with free communication (`compute_only_step_s`): the communication that compute
    does not hide."""

    step_s: float
    tokens_per_s: float
    compute_only_step_s: float
    devices: dict[str, DeviceTime]
    events: list[TraceEvent] = field(default_factory=list, repr=False)
    action_starts_s: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def exposed_comm_s(self) -> float:
        return max(0.0, self.step_s - self.compute_only_step_s)

    def mean_share(self, what: str) -> float:
        """Mean over devices of `busy_share`, `idle_share`, `bubble_share`, `imbalance_share`
        or `comm_wait_share`."""
        if not self.devices:
            return 0.0
        return sum(getattr(d, what) for d in self.devices.values()) / len(self.devices)

    def to_dict(self) -> dict[str, Any]:
        return {"step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                "compute_only_step_s": self.compute_only_step_s,
                "exposed_comm_s": self.exposed_comm_s,
                "mean_busy_share": self.mean_share("busy_share"),
                "mean_bubble_share": self.mean_share("bubble_share"),
                "mean_imbalance_share": self.mean_share("imbalance_share"),
                "mean_comm_wait_share": self.mean_share("comm_wait_share"),
                "devices": {d: t.to_dict() for d, t in self.devices.items()}}

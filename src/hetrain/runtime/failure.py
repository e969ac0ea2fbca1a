"""Which devices a failed run lost: the launcher asks once a worker has failed, before it
stops the others, so a supervisor can re-plan without them.

A worker that reports an error (error<rank>.txt) is a witness, not a suspect: it saw a peer
vanish or time out. Lost are the workers that died without a report (killed, crashed hard,
device gone), or, when every failed worker reported, those still silent once the others
have all reported or the grace period (an op timeout) has passed: hung. A worker whose own
report is a device fault (a CUDA/HIP error, ECC) is lost too. When every worker reports
otherwise, or every worker died alike, the cause is in the code, data or set-up, and no
device is blamed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


def lost_ranks(procs: list, out_dir: str | Path, grace_s: float, poll_s: float = 0.05
               ) -> list[int]:
    """Ranks presumed lost; `procs` are multiprocessing.Process objects in rank order."""
    out = Path(out_dir)

    def reported(r: int) -> bool:
        return (out / f"error{r}.txt").exists()

    deadline = time.monotonic() + grace_s
    while True:
        codes = [p.exitcode for p in procs]
        died = [r for r, c in enumerate(codes) if c not in (None, 0) and not reported(r)]
        died += [r for r, c in enumerate(codes) if c not in (None, 0) and reported(r)
                 and _device_fault(out / f"error{r}.txt")]
        if died:
            return sorted(died) if len(died) < len(procs) else []
        silent = [r for r, c in enumerate(codes) if c is None and not reported(r)]
        if not silent or time.monotonic() > deadline:
            return silent
        time.sleep(poll_s)


def lost_message(rank_devices: list[str], lost: list[int], procs: list, grace_s: float) -> str:
    parts = []
    for r in lost:
        code = procs[r].exitcode
        how = f"died with exit code {code}" if code is not None else \
            f"hung (no progress, no report within {grace_s:.0f} s of its peers' timeouts)"
        parts.append(f"worker {r} ({rank_devices[r]}) {how}")
    return "; ".join(parts) + "; the other workers were stopped"


_DEVICE_FAULTS = ("CUDA error", "HIP error", "NPU error", "uncorrectable ECC", "device lost")


def _device_fault(report: Path) -> bool:
    try:
        first = report.read_text().split("\n", 1)[0]
    except OSError:
        return False
    return any(fault in first for fault in _DEVICE_FAULTS)


# --- heartbeats: a silent worker is declared lost while its peers still wait ----------------
HANG_FLOOR_S = 20.0  # default hang timeout: at least this, or a few of the slowest steps
HANG_STEPS = 5
STARTUP_S = 120.0  # before its first beat a worker may import, build and load for this long


@dataclass(frozen=True)
class Suspect:
    """A progress record: worker `rank` has sent no heartbeat for `silent_s` seconds."""

    rank: int
    device: str
    silent_s: float

    def describe(self) -> str:
        return f"waiting on worker {self.rank} ({self.device}): silent {self.silent_s:.0f} s"


class Heartbeats:
    """Watches the workers' heartbeat counters (see runtime/watchdog.py) in `store`."""

    def __init__(self, store, key_of, world: int, hang_timeout_s: float | None):
        self.store, self.key_of, self.world = store, key_of, world
        self.fixed_timeout_s = hang_timeout_s
        self.slowest_step_s = 0.0
        now = time.monotonic()
        self.count = [0] * world
        self.changed_at = [now] * world
        self.polled_at = now

    def note_step(self, step_s: float) -> None:
        self.slowest_step_s = max(self.slowest_step_s, step_s)

    @property
    def timeout_s(self) -> float:
        if self.fixed_timeout_s is not None:
            return self.fixed_timeout_s
        return max(HANG_FLOOR_S, HANG_STEPS * self.slowest_step_s)

    def poll(self) -> None:
        now = time.monotonic()
        if now - self.polled_at > 2.0:  # the launcher itself stalled: no one can be judged
            self.changed_at = [now] * self.world
        self.polled_at = now
        for r in range(self.world):
            count = self.store.counter(self.key_of(r))
            if count != self.count[r]:
                self.count[r], self.changed_at[r] = count, now

    def silent_s(self, rank: int) -> float:
        return time.monotonic() - self.changed_at[rank]

    def allowed_s(self, rank: int) -> float:
        return self.timeout_s if self.count[rank] else max(STARTUP_S, self.timeout_s)

    def hung(self, alive: list[int]) -> list[int]:
        """Live workers silent past their allowance."""
        return [r for r in alive if self.silent_s(r) > self.allowed_s(r)]

    def suspect(self, alive: list[int]) -> int | None:
        """The live worker silent longest, once it is late (beats come every 0.5 s)."""
        late = [r for r in alive if self.count[r] and self.silent_s(r) > 2.0]
        return max(late, key=self.silent_s) if late else None

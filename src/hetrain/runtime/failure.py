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

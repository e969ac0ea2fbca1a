"""Tensor-parallel entries of a profile: each layer of the reference decoder timed on a real
tp-way group of one kind's devices (one spawned process per device), TP all-reduces included.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
from datetime import timedelta
from pathlib import Path

from hetrain.comm.groups import torch_backend
from hetrain.cost.profile import (
    TORCH_DTYPES,
    ProfileEntry,
    measure_layers,
    sample_ids,
)
from hetrain.errors import CostError
from hetrain.runtime.rendezvous import LOOPBACK, LoopbackStore, gloo_on_loopback


def _time_group(cfg, devices: list[str], native: str, dtype: str, seq_len: int,
                micro_batch_sizes: list[int], repeats: int, rank: int, port: int,
                out_dir: str) -> None:
    """Process entry: one rank of the tp-way group; writes its per-layer figures as JSON."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from hetrain.model.source import DecoderModel

    gloo_on_loopback()
    torch.set_num_threads(1)
    device = devices[rank]
    tp = len(devices)
    backend = torch_backend(native, torch.device(device).type)
    timeout = timedelta(seconds=300)
    store = dist.TCPStore(LOOPBACK, port, tp, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=tp, timeout=timeout)
    try:
        model = DecoderModel(cfg)
        stage = model.build_stage(0, model.n_layers, seed=0)
        mesh = DeviceMesh(torch.device(device).type, list(range(tp)))
        model.apply_tensor_parallel(stage, mesh, model.spec(seq_len).sequence_parallel(tp))
        stage.to(device=device, dtype=getattr(torch, TORCH_DTYPES[dtype]))
        figures = {}
        for mbs in micro_batch_sizes:
            x = sample_ids(cfg, mbs, seq_len).to(device)
            figures[mbs] = measure_layers(stage.layers, x, device, repeats)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def measure_tp_entries(cfg, devices: list[str], native_backend: str, dtype: str, seq_len: int,
                       micro_batch_sizes: list[int], repeats: int = 3,
                       timeout_s: float = 600.0) -> list[ProfileEntry]:
    """One entry per micro-batch size for a group over `devices` (torch devices; "cpu" may
    repeat): per layer, the slowest rank's seconds per token."""
    tp = len(devices)
    ctx = mp.get_context("spawn")
    store = LoopbackStore(tp, 300.0)  # the rendezvous listens on 127.0.0.1 only
    with tempfile.TemporaryDirectory(prefix="hetrain-profile-") as out:
        procs = [ctx.Process(target=_time_group, daemon=True,
                             args=(cfg, devices, native_backend, dtype, seq_len,
                                   micro_batch_sizes, repeats, r, store.port, out))
                 for r in range(tp)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            store.close()
        files = [Path(out, f"rank{r}.json") for r in range(tp)]
        if any(not f.exists() for f in files):
            codes = [p.exitcode for p in procs]
            raise CostError(f"timing a tp-{tp} group on {', '.join(devices)} failed (exit codes "
                            f"{codes}); check that the model's heads divide by {tp}")
        ranks = [json.loads(f.read_text()) for f in files]
    entries = []
    for mbs in micro_batch_sizes:
        per_rank = [r[str(mbs)] for r in ranks]
        fwd = [max(vals) for vals in zip(*(f for f, _ in per_rank), strict=True)]
        bwd = [max(vals) for vals in zip(*(b for _, b in per_rank), strict=True)]
        entries.append(ProfileEntry(tp=tp, micro_batch_size=mbs, forward_s_per_token=fwd,
                                    backward_s_per_token=bwd))
    return entries


def tp_devices(present: list[str], tp: int) -> list[str]:
    """Torch devices for a tp-way group: the first `tp` present; CPU processes share "cpu"."""
    if present and all(d == "cpu" for d in present):
        return ["cpu"] * tp
    if len(present) < tp:
        raise CostError(f"tp {tp} needs {tp} devices of the kind; {len(present)} present")
    return present[:tp]


"""`hetrain profile`: time each layer of the reference model on the devices present here, per
tensor-parallel degree and micro-batch size."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import app, user_errors
from hetrain.errors import CostError, ModelError


def int_list(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise CostError(f"{option} takes comma-separated whole numbers, not {text!r}") from None
    if not values or values[0] < 1:
        raise CostError(f"{option} takes numbers >= 1, not {text!r}")
    return values


@app.command()
@user_errors
def profile(
    model: str = typer.Option("tiny", help="a trainable model: tiny, small, ..."),
    out: Path = typer.Option(Path("profile.json"), help="where to write the profile"),
    seq_len: int | None = typer.Option(None, min=1, help="tokens per sample [model's maximum]"),
    micro_batch_size: str = typer.Option("1", help="samples per timed pass; a comma-separated "
                                         "list measures each"),
    tp: str = typer.Option("1", help="tensor-parallel degrees to measure, e.g. 1,2,4 (tp 1 "
                           "is always measured)"),
    repeats: int = typer.Option(3, min=1, help="timed passes per layer (the median is kept)"),
    kinds: str | None = typer.Option(None, help="comma-separated kinds [every kind present]"),
    dtype: str | None = typer.Option(None, help="dtype for every kind [each kind's best]"),
) -> None:
    """Measure seconds per token of each layer's forward and backward, per kind present, TP
    degree and micro-batch size; `hetrain plan --profile` and `hetrain simulate --profile`
    then use them instead of the catalog's roofline."""
    from hetrain.cluster.discovery import present_kinds
    from hetrain.cluster.kinds import CATALOG
    from hetrain.cost.profile import measure_profile, with_entries
    from hetrain.model.config import model_config
    from hetrain.plan.io import check_writable_file
    from hetrain.runtime.profiling import measure_tp_entries, tp_devices

    check_writable_file(out, "--out")
    cfg = model_config(model)
    seq = seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise ModelError(f"--seq-len {seq} is longer than {cfg.name}'s max_seq_len "
                         f"{cfg.max_seq_len}")
    sizes = int_list(micro_batch_size, "--micro-batch-size")
    degrees = sorted(set(int_list(tp, "--tp")) | {1})
    present = present_kinds()
    if kinds is not None:
        wanted = [k.strip() for k in kinds.split(",") if k.strip()]
        missing = [k for k in wanted if k not in present]
        if missing:
            raise CostError(f"kind {missing[0]!r} is not present here (present: "
                            f"{', '.join(present)}); run 'hetrain devices'")
        present = {k: present[k] for k in wanted}
    if dtype is not None:
        for kind in present:
            if not CATALOG[kind].supports(dtype):
                raise CostError(f"{kind} does not compute in {dtype}; use one of "
                                f"{', '.join(CATALOG[kind].flops)} or leave --dtype out")
    for kind in present:  # refuse a degree that cannot run before timing anything
        for degree in degrees:
            tp_devices(present[kind], degree)
    prof = measure_profile(cfg, present, CATALOG, seq_len=seq, micro_batch_sizes=sizes,
                           repeats=repeats, dtype=dtype)
    for kind, devices in present.items():
        entries = [e for degree in degrees if degree > 1 for e in measure_tp_entries(
            cfg, tp_devices(devices, degree), CATALOG[kind].backend, prof.kinds[kind].dtype,
            seq, sizes, repeats)]
        if entries:
            prof = with_entries(prof, kind, entries)
    prof.save(out)
    _print(prof)
    Console().print(f"profile written to {out}")


def _print(prof) -> None:
    table = Table(title=f"{prof.model}: per micro-batch of {prof.seq_len}-token samples")
    for col in ("kind", "device", "dtype", "tp", "micro-batch", "forward ms", "backward ms",
                "tokens/s per device"):
        table.add_column(col, justify="left" if col in ("kind", "device", "dtype") else "right")
    for kind, kp in prof.kinds.items():
        for e in kp.entries:
            tokens = e.micro_batch_size * prof.seq_len
            fwd = tokens * sum(e.forward_s_per_token)
            bwd = tokens * sum(e.backward_s_per_token)
            table.add_row(kind, kp.device, kp.dtype, str(e.tp), str(e.micro_batch_size),
                          f"{1e3 * fwd:.2f}", f"{1e3 * bwd:.2f}", f"{tokens / (fwd + bwd):,.0f}")
    Console().print(table)

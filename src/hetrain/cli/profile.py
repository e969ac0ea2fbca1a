"""`hetrain profile`: time each layer of the reference model on the devices present here."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetrain.cli.main import app, user_errors
from hetrain.errors import CostError, ModelError


@app.command()
@user_errors
def profile(
    model: str = typer.Option("tiny", help="a trainable model: tiny, small, ..."),
    out: Path = typer.Option(Path("profile.json"), help="where to write the profile"),
    seq_len: int | None = typer.Option(None, min=1, help="tokens per sample [model's maximum]"),
    micro_batch_size: int = typer.Option(1, min=1, help="samples per timed pass"),
    repeats: int = typer.Option(3, min=1, help="timed passes per layer (the median is kept)"),
    kinds: str | None = typer.Option(None, help="comma-separated kinds [every kind present]"),
    dtype: str | None = typer.Option(None, help="dtype for every kind [each kind's best]"),
) -> None:
    """Measure seconds per token of each layer's forward and backward, per kind present;
    `hetrain plan --profile` then uses them instead of the catalog's roofline."""
    from hetrain.cluster.discovery import present_kinds
    from hetrain.cluster.kinds import CATALOG
    from hetrain.cost.profile import measure_profile
    from hetrain.model.config import model_config
    from hetrain.plan.io import check_writable_file

    check_writable_file(out, "--out")
    cfg = model_config(model)
    seq = seq_len or cfg.max_seq_len
    if seq > cfg.max_seq_len:
        raise ModelError(f"--seq-len {seq} is longer than {cfg.name}'s max_seq_len "
                         f"{cfg.max_seq_len}")
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
    prof = measure_profile(cfg, present, CATALOG, seq_len=seq,
                           micro_batch_size=micro_batch_size, repeats=repeats, dtype=dtype)
    prof.save(out)
    tokens = micro_batch_size * seq
    table = Table(title=f"{cfg.name}: per micro-batch of {micro_batch_size} x {seq} tokens")
    for col in ("kind", "device", "dtype", "forward ms", "backward ms", "tokens/s"):
        table.add_column(col, justify="left" if col in ("kind", "device", "dtype") else "right")
    for kind, kp in prof.kinds.items():
        fwd = tokens * sum(kp.forward_s_per_token)
        bwd = tokens * sum(kp.backward_s_per_token)
        table.add_row(kind, kp.device, kp.dtype, f"{1e3 * fwd:.2f}", f"{1e3 * bwd:.2f}",
                      f"{tokens / (fwd + bwd):,.0f}")
    Console().print(table)
    Console().print(f"profile written to {out}")

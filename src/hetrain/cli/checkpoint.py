"""`hetrain export`: a checkpoint's model as one safetensors file, by full-model names."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from hetrain.cli.main import app, user_errors
from hetrain.errors import CheckpointError
from hetrain.runtime.checkpoint import read_model, resolve_checkpoint


@app.command()
@user_errors
def export(
    checkpoint: Path = typer.Option(..., help="a checkpoint folder (step-*), or a "
                                    "checkpoint_dir: its newest good checkpoint"),
    out: Path = typer.Option(..., help="the .safetensors file to write"),
) -> None:
    """Write a checkpoint's parameters (full, unsharded) as safetensors; checksums are
    verified first, and a damaged checkpoint is refused."""
    from safetensors.torch import save_file

    from hetrain.plan.io import check_writable_file

    check_writable_file(out, "--out")
    found = resolve_checkpoint(checkpoint)
    for refused in found.refused:
        # Plain text: a refused checkpoint's message holds paths rich would read as markup.
        Console(stderr=True).print(Text.assemble(("skipped:", "yellow"), " ", refused),
                                   highlight=False)
    params, meta = read_model(found.path)
    if not params:
        raise CheckpointError(f"checkpoint {found.path} holds no model parameters")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp),
              metadata={"format": "hetrain", "model": str(meta["model"]),
                        "step": str(meta["step"])})
    os.replace(tmp, out)
    n = sum(v.numel() for v in params.values())
    Console().print(f"exported {found.path} (model {meta['model']}, step {meta['step']}, "
                    f"{len(params)} tensors, {n:,} parameters) to {out}", highlight=False)

"""`hetrain export`: a checkpoint's model as one safetensors file, by full-model names, or as a
Hugging Face model folder that `from_pretrained` reads."""

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
    out: Path | None = typer.Option(None, help="the .safetensors file to write"),
    hf_folder: Path | None = typer.Option(None, help="a Hugging Face model: write a folder "
                                          "(config.json, model.safetensors) for "
                                          "from_pretrained"),
) -> None:
    """Write a checkpoint's parameters (full, unsharded) as safetensors; checksums are
    verified first, and a damaged checkpoint is refused."""
    from safetensors.torch import save_file

    from hetrain.plan.io import check_writable_dir, check_writable_file

    if (out is None) == (hf_folder is None):
        raise CheckpointError("give one of --out (a .safetensors file) or --hf-folder")
    check_writable_file(out, "--out")
    check_writable_dir(hf_folder, "--hf-folder")
    found = resolve_checkpoint(checkpoint)
    for refused in found.refused:
        # Plain text: a refused checkpoint's message holds paths rich would read as markup.
        Console(stderr=True).print(Text.assemble(("skipped:", "yellow"), " ", refused),
                                   highlight=False)
    params, meta = read_model(found.path)
    if not params:
        raise CheckpointError(f"checkpoint {found.path} holds no model parameters")
    n = sum(v.numel() for v in params.values())
    done = (f"exported {found.path} (model {meta['model']}, step {meta['step']}, "
            f"{len(params)} tensors, {n:,} parameters) to ")
    if hf_folder is not None:
        from hetrain.model.hf import save_hf_folder
        from hetrain.model.loading import load_model

        save_hf_folder(load_model(meta["model"]), params, hf_folder,
                       {"model": str(meta["model"]), "step": str(meta["step"])})
        Console().print(done + str(hf_folder), highlight=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp),
              metadata={"format": "hetrain", "model": str(meta["model"]),
                        "step": str(meta["step"])})
    os.replace(tmp, out)
    Console().print(done + str(out), highlight=False)

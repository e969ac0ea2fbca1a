"""`hetrain data prepare`: text into a memory-mapped token file for `--data`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetrain.cli.main import app, user_errors
from hetrain.plan.io import check_writable_file

data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")
app.add_typer(data_app, name="data")


@data_app.command()
@user_errors
def prepare(
    texts: list[Path] = typer.Argument(..., help="text files, encoded in this order"),
    out: Path = typer.Option(..., help="the token file to write (NAME.bin; its sidecar "
                             "NAME.bin.json goes beside it)"),
    tokenizer: Path | None = typer.Option(None, help="a Hugging Face tokenizer.json"),
    train_vocab: int | None = typer.Option(None, min=2, help="train a byte-level BPE of this "
                                           "many ids on the texts (saved as "
                                           "NAME.tokenizer.json)"),
) -> None:
    """Tokenize text into a flat uint16/uint32 token file; without --tokenizer or
    --train-vocab the ids are the UTF-8 bytes (the byte tokenizer of the default data)."""
    from hetrain.data.prepare import prepare as run_prepare

    check_writable_file(out, "--out")
    meta = run_prepare(texts, out, tokenizer, train_vocab)
    Console().print(f"wrote {out}: {meta['tokens']:,} tokens ({meta['dtype']}, vocabulary "
                    f"{meta['vocab_size']:,}"
                    + (f", tokenizer {meta['tokenizer']}" if meta["tokenizer"] else "") + ")",
                    highlight=False)

"""Text corpora as byte tokens, and the deterministic global batch of each step.

The default corpus is the Python standard library's own source, which exists on every
machine that runs hetrain, so training needs no download.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from hetrain.errors import DataError

VOCAB_SIZE = 256  # byte-level tokenizer: token id = byte value


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class Corpus:
    """A 1-D tensor of token ids; `global_batch(step)` is a pure function of (seed, step)."""

    def __init__(self, tokens: torch.Tensor, name: str, seed: int = 0):
        if tokens.ndim != 1:
            raise DataError(f"corpus {name}: expected a 1-D sequence of token ids")
        self.tokens = tokens
        self.name = name
        self.seed = seed

    def __len__(self) -> int:
        return self.tokens.numel()

    def global_batch(self, step: int, batch_size: int, seq_len: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len]; targets are inputs shifted by one."""
        if len(self) < seq_len + 2:
            raise DataError(f"corpus {self.name} has {len(self)} tokens, fewer than seq_len + 2 "
                            f"= {seq_len + 2}; use a longer text or a shorter --seq-len")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self) - seq_len - 1, (batch_size,), generator=gen)
        windows = torch.stack([self.window(s, seq_len + 1) for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def window(self, start: int, length: int) -> torch.Tensor:
        """Token ids [start, start + length) as int64."""
        return self.tokens[start : start + length]

    def token_range(self) -> tuple[int, int]:
        """The smallest and largest token id."""
        return int(self.tokens.min()), int(self.tokens.max())


def default_corpus(seed: int = 0, max_bytes: int = 4_000_000) -> Corpus:
    """Up to `max_bytes` of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if not chunks:
        raise DataError(f"no Python sources found under {root} for the default corpus; "
                        "pass a text file with --data")
    blob = b"".join(chunks)[:max_bytes]
    return Corpus(torch.frombuffer(bytearray(blob), dtype=torch.uint8).long(),
                  f"python-stdlib ({root})", seed)


def text_corpus(path: str | Path, seed: int = 0) -> Corpus:
    """A user's text file, or every *.txt / *.md / *.py file under a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".py"))
        if not files:
            raise DataError(f"{path}: no .txt, .md or .py files in this folder")
        blob = b"\n".join(_read(p) for p in files)
    else:
        blob = _read(path)
    if not blob:
        raise DataError(f"{path}: the data is empty; give a text with at least one sample "
                        "(seq_len + 2 bytes)")
    return Corpus(torch.frombuffer(bytearray(blob), dtype=torch.uint8).long(), str(path), seed)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file ({err.strerror})") from None

"""Token files: flat little-endian uint16 or uint32 token ids, memory-mapped (the layout of
nanoGPT's `train.bin` and Megatron's `.bin`), one file or a folder of them read as one sequence.

    train.bin               the ids, nothing else
    train.bin.json          sidecar (written by `hetrain data prepare`): {"format":
                            "hetrain-tokens/1", "dtype": "uint16", "tokens": N, "vocab_size": V,
                            "min_token": a, "max_token": b, "tokenizer": "train.tokenizer.json"}

The dtype comes from the sidecar; without one, from the name (`*.u32.bin`: uint32, any other
`.bin`: uint16, nanoGPT's). A folder's `.bin` files are read in sorted name order. Samples are
drawn exactly as from a text corpus (data/corpus.py: a pure function of (seed, step)); a
sample may span two files of a folder.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import torch

from hetrain.data.corpus import Corpus
from hetrain.errors import DataError

FORMAT = "hetrain-tokens/1"
SUFFIX = ".bin"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def is_token_data(data: str | Path) -> bool:
    """A `.bin` file, or a folder holding one."""
    path = Path(data)
    if path.is_dir():
        return any(path.glob(f"*{SUFFIX}"))
    return path.suffix == SUFFIX


def read_sidecar(path: Path) -> dict:
    side = sidecar_of(path)
    if not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{side}: unreadable token-file sidecar ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{side}: not a {FORMAT} sidecar; remove it or rewrite it with "
                        "`hetrain data prepare`")
    return meta


def token_dtype(path: Path, meta: dict) -> np.dtype:
    name = meta.get("dtype") or ("uint32" if path.name.endswith(".u32.bin") else "uint16")
    if name not in DTYPES:
        raise DataError(f"{sidecar_of(path)}: dtype {name!r}; use uint16 or uint32")
    return np.dtype(DTYPES[name])


class TokenCorpus(Corpus):
    """Token files, memory-mapped on first use (pickled to workers by path, not by value)."""

    def __init__(self, paths: list[Path], name: str, seed: int = 0):
        self.paths, self.name, self.seed = paths, name, seed
        self.metas = [read_sidecar(p) for p in paths]
        self.dtypes = [token_dtype(p, m) for p, m in zip(paths, self.metas, strict=True)]
        sizes = []
        for path, dtype in zip(paths, self.dtypes, strict=True):
            nbytes = path.stat().st_size
            if nbytes % dtype.itemsize:
                raise DataError(f"{path}: {nbytes} bytes is not a whole number of {dtype.name} "
                                "tokens; the file is truncated or of another dtype")
            sizes.append(nbytes // dtype.itemsize)
        self.starts = list(np.cumsum([0] + sizes[:-1]).tolist())
        self.total = int(sum(sizes))
        if self.total == 0:
            raise DataError(f"{name}: the token data is empty; prepare it from a text with "
                            "`hetrain data prepare`")
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.total

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=d, mode="r") if s else np.zeros(0, d)
                          for p, d, s in zip(self.paths, self.dtypes, self._sizes(),
                                             strict=True)]
        return self._maps

    def _sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.starts, self.starts[1:] + [self.total], strict=True)]

    def window(self, start: int, length: int) -> torch.Tensor:
        parts, pos, end = [], start, start + length
        i = bisect.bisect_right(self.starts, pos) - 1
        while pos < end:
            local = pos - self.starts[i]
            take = min(end - pos, len(self.maps[i]) - local)
            parts.append(np.asarray(self.maps[i][local:local + take], dtype=np.int64))
            pos += take
            i += 1
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def token_range(self) -> tuple[int, int]:
        if all("min_token" in m and "max_token" in m for m in self.metas):
            return (min(m["min_token"] for m in self.metas),
                    max(m["max_token"] for m in self.metas))
        nonempty = [m for m in self.maps if len(m)]
        return int(min(m.min() for m in nonempty)), int(max(m.max() for m in nonempty))

    @property
    def vocab_size(self) -> int | None:
        sizes = [m.get("vocab_size") for m in self.metas]
        return max(sizes) if all(isinstance(v, int) for v in sizes) else None


def token_corpus(data: str | Path, seed: int = 0) -> TokenCorpus:
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such token file or folder")
    paths = sorted(path.glob(f"*{SUFFIX}")) if path.is_dir() else [path]
    return TokenCorpus(paths, str(path), seed)


def write_tokens(path: Path, ids: np.ndarray, vocab_size: int,
                 tokenizer: str | None) -> dict:
    """Write `ids` as a token file (uint16 when the vocabulary fits, else uint32) and its
    sidecar; returns the sidecar."""
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    path.parent.mkdir(parents=True, exist_ok=True)
    ids.astype(DTYPES[dtype]).tofile(path)
    meta = {"format": FORMAT, "dtype": dtype, "tokens": int(ids.size),
            "vocab_size": int(vocab_size),
            "min_token": int(ids.min()) if ids.size else 0,
            "max_token": int(ids.max()) if ids.size else 0, "tokenizer": tokenizer}
    sidecar_of(path).write_text(json.dumps(meta, indent=1) + "\n")
    return meta

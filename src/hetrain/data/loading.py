"""The corpus a run reads: the stdlib default, a token file or folder of them, or text."""

from __future__ import annotations

from pathlib import Path

from hetrain.data.corpus import Corpus, default_corpus, text_corpus
from hetrain.data.tokens import is_token_data, token_corpus


def load_corpus(data: str | Path | None, seed: int = 0) -> Corpus:
    """The stdlib default, a token file or folder of them (data/tokens.py), or text."""
    if data in (None, "", "default"):
        return default_corpus(seed)
    return token_corpus(data, seed) if is_token_data(data) else text_corpus(data, seed)

"""Data: byte-level text corpora and the deterministic global batch of each step."""

from hetrain.data.corpus import VOCAB_SIZE, Corpus, decode, default_corpus, encode
from hetrain.data.loading import load_corpus

__all__ = ["VOCAB_SIZE", "Corpus", "decode", "default_corpus", "encode", "load_corpus"]

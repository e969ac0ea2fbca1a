"""`hetrain data prepare`: text files into a token file (data/tokens.py), with a Hugging Face
`tokenizers` tokenizer (a tokenizer.json, or a byte-level BPE trained here on the given text
and saved beside the output), or the byte tokenizer (ids = UTF-8 bytes) when none is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetrain.data.tokens import SUFFIX, write_tokens
from hetrain.errors import DataError

CHUNK_CHARS = 1 << 20  # text is encoded in pieces of about this many characters (memory)
# A trained tokenizer keeps all 256 bytes in its alphabet (any later text encodes) when its
# vocabulary has room for merges besides them; a smaller one has only the bytes of its text.
FULL_ALPHABET_VOCAB = 512


def tokenizer_path(out: Path) -> Path:
    """Where a tokenizer trained for `out` is saved: train.bin -> train.tokenizer.json."""
    return out.with_name(out.name.removesuffix(SUFFIX) + ".tokenizer.json")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("the `tokenizers` package is needed for --tokenizer/--train-vocab; "
                        "pip install tokenizers") from None
    return tokenizers


def load_tokenizer(path: Path):
    try:
        return _tokenizers().Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own Exception subclasses
        raise DataError(f"{path}: not a tokenizer.json ({str(err).splitlines()[0]})") from None


def train_tokenizer(texts: list[Path], vocab_size: int):
    """A byte-level BPE of `vocab_size` ids trained on `texts`."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet() if vocab_size >= FULL_ALPHABET_VOCAB \
        else []
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                     show_progress=False)
    tok.train([str(p) for p in texts], trainer)
    return tok


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"{path}: cannot read the text ({err.strerror})") from None


def _chunks(text: str) -> list[str]:
    """Pieces of about CHUNK_CHARS, cut after a newline (tokens do not span the cuts)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def encode_files(texts: list[Path], tokenizer) -> np.ndarray:
    """Token ids of every file in order, each followed by a newline (None: UTF-8 bytes)."""
    arrays = []
    for path in texts:
        text = _read_text(path) + "\n"
        if tokenizer is None:
            arrays.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
            continue
        for enc in tokenizer.encode_batch(_chunks(text), add_special_tokens=False):
            arrays.append(np.asarray(enc.ids, dtype=np.int64))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def prepare(texts: list[Path], out: Path, tokenizer: Path | None = None,
            train_vocab: int | None = None) -> dict:
    """Write `out` (and its sidecar; a trained tokenizer beside it); returns the sidecar."""
    if out.suffix != SUFFIX:
        raise DataError(f"--out {out}: a token file's name ends in {SUFFIX}")
    if tokenizer is not None and train_vocab is not None:
        raise DataError("give --tokenizer or --train-vocab, not both")
    missing = [p for p in texts if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such text file")
    if train_vocab is not None:
        tok = train_tokenizer(texts, train_vocab)
        saved = tokenizer_path(out)
        saved.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(saved))
        name = saved.name
    elif tokenizer is not None:
        tok, name = load_tokenizer(tokenizer), str(tokenizer)
    else:
        tok, name = None, None
    ids = encode_files(texts, tok)
    vocab = 256 if tok is None else tok.get_vocab_size()
    return write_tokens(out, ids, vocab, name)

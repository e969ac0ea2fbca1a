"""Token files (data/tokens.py) and `hetrain data prepare` (data/prepare.py): samples drawn
exactly as from an in-memory corpus of the same ids, folders read as one sequence, tokenizers
trained locally or loaded, refusals in one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.data.corpus import Corpus
from hetrain.data.loading import load_corpus
from hetrain.data.tokens import TokenCorpus, read_sidecar, write_tokens
from hetrain.errors import DataError

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 200


def _ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def _same_batches(a: Corpus, b: Corpus, steps: int = 4) -> None:
    for step in range(steps):
        for x, y in zip(a.global_batch(step, 5, 12), b.global_batch(step, 5, 12), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("vocab, dtype, width", [(1000, "uint16", 2), (70_000, "uint32", 4)])
def test_token_file_samples_like_the_same_ids_in_memory(tmp_path, vocab, dtype, width):
    ids = _ids(5000, vocab)
    path = tmp_path / "train.bin"
    write_tokens(path, ids, vocab, None)
    assert read_sidecar(path)["dtype"] == dtype and path.stat().st_size == width * ids.size
    corpus = load_corpus(path, seed=3)
    assert isinstance(corpus, TokenCorpus) and len(corpus) == ids.size
    assert corpus.token_range() == (int(ids.min()), int(ids.max()))
    _same_batches(corpus, Corpus(torch.from_numpy(ids), "mem", seed=3))


def test_folder_is_one_sequence_and_sidecars_are_optional(tmp_path):
    """nanoGPT's bare uint16 `.bin`, a `.u32.bin` by name: samples cross the file boundary."""
    ids = _ids(300, 5000)
    ids[:150].astype(np.uint16).tofile(tmp_path / "a.bin")
    ids[150:].astype(np.uint32).tofile(tmp_path / "b.u32.bin")
    corpus = load_corpus(tmp_path)
    assert len(corpus) == 300 and corpus.token_range() == (int(ids.min()), int(ids.max()))
    torch.testing.assert_close(corpus.window(140, 20), torch.from_numpy(ids[140:160]))
    _same_batches(corpus, Corpus(torch.from_numpy(ids), "mem"), steps=8)


def test_pickled_by_path_not_by_value(tmp_path):
    write_tokens(tmp_path / "big.bin", _ids(200_000, 1000), 1000, None)
    corpus = load_corpus(tmp_path / "big.bin")
    corpus.global_batch(0, 2, 8)  # maps the file
    again = pickle.loads(pickle.dumps(corpus))
    assert len(pickle.dumps(corpus)) < 10_000
    _same_batches(corpus, again, steps=2)


def test_truncated_file_is_refused(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a whole number of uint16"):
        load_corpus(tmp_path / "odd.bin")


def test_prepare_trains_a_tokenizer_and_reuses_it(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    text = tmp_path / "code.txt"
    text.write_text(TEXT)
    out = tmp_path / "train.bin"
    result = CliRunner().invoke(app, ["data", "prepare", str(text), "--out", str(out),
                                      "--train-vocab", "200"])
    assert result.exit_code == 0, result.output
    meta = read_sidecar(out)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "train.tokenizer.json"))
    ids = np.fromfile(out, dtype=np.uint16)
    assert meta["tokens"] == ids.size < len(TEXT) / 2  # merges learned
    assert meta["vocab_size"] == tok.get_vocab_size() <= 200 and meta["max_token"] < 200
    assert tok.decode(ids.tolist()) == TEXT + "\n"
    again = tmp_path / "again.bin"
    result = CliRunner().invoke(app, ["data", "prepare", str(text), "--out", str(again),
                                      "--tokenizer", str(tmp_path / "train.tokenizer.json")])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.fromfile(again, dtype=np.uint16), ids)


def test_prepare_without_tokenizer_writes_bytes(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("héllo")
    out = tmp_path / "t.bin"
    assert CliRunner().invoke(app, ["data", "prepare", str(text), "--out", str(out)]
                              ).exit_code == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == list("héllo\n".encode())


@pytest.mark.parametrize("args, message", [
    (["--out", "x.txt"], "ends in .bin"),
    (["--out", "x.bin", "--train-vocab", "300", "--tokenizer", "t.json"], "not both"),
    (["--out", "x.bin", "--tokenizer", "missing.json"], "missing.json"),
])
def test_prepare_refusals_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    result = CliRunner().invoke(app, ["data", "prepare", "t.txt", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1

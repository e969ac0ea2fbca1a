"""`hetrain.fit` and `runtime.train` check every input before a worker starts, raising the
part's error (never a raw pydantic ValidationError or a TypeError); the README's example runs
as a script, and a script without a `__main__` guard is told what is missing."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import hetrain
from hetrain.errors import (
    CheckpointError,
    ClusterError,
    ConfigError,
    DataError,
    HetrainError,
    ModelError,
)
from hetrain.plan import expand_plan
from hetrain.runtime import TrainConfig
from hetrain.runtime import train as runtime_train
from tests.refusals import ROOT, THREE


class Bigram(nn.Module):
    def __init__(self, vocab: int = 256):
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, tokens):
        return self.out(self.embed(tokens))


def _fit(sandbox, **overrides):
    kwargs = {"cluster": THREE, "steps": 2, "global_batch": 4, "seq_len": 8,
              "time_scale": 1e-9, **overrides}
    model = kwargs.pop("model", Bigram())
    data = kwargs.pop("data", torch.arange(200) % 256)
    before = sandbox.snapshot()
    try:
        hetrain.fit(model, data, **kwargs)
    finally:
        assert not sandbox.spawned, "a worker was spawned"
        assert sandbox.snapshot() == before, "something was written"


@pytest.mark.parametrize("overrides, error, words", [
    ({"lr": -1.0}, ConfigError, ["lr:", "finite number > 0"]),
    ({"lr": float("inf")}, ConfigError, ["lr:", "(got inf)"]),
    ({"lr": float("nan")}, ConfigError, ["lr:", "(got nan)"]),
    ({"lr": "fast"}, ConfigError, ["lr:"]),
    ({"steps": 0}, ConfigError, ["steps:"]),
    ({"steps": 2.5}, ConfigError, ["steps:"]),
    ({"time_scale": 0}, ConfigError, ["time_scale:"]),
    ({"weight_decay": -0.1}, ConfigError, ["weight_decay:"]),
    ({"precision": "fp8"}, ConfigError, ["precision:", "float32"]),
    ({"global_batch": 0}, ConfigError, ["global_batch:"]),
    ({"global_batch": "48"}, ConfigError, ["global_batch:"]),
    ({"seq_len": 1}, ConfigError, ["seq_len:"]),
    ({"global_batch": 10**9}, ConfigError, ["global_batch", "limit"]),
    ({"cluster": 3}, ClusterError, ["cluster must be"]),
    ({"cluster": "missing.yaml"}, ClusterError, ["missing.yaml", "cannot read"]),
    ({"model": "not a module"}, ModelError, ["nn.Module"]),
    ({"model": nn.Module()}, ModelError, ["no trainable parameters"]),
    ({"data": b"bytes"}, DataError, ["data must be"]),
    ({"data": torch.rand(100)}, DataError, ["integer token ids"]),
    ({"data": torch.arange(5)}, DataError, ["5 tokens", "seq_len + 2 = 10"]),
    ({"data": torch.arange(300)}, DataError, ["token id 299", "vocabulary of 256"]),
    ({"data": "empty.txt"}, DataError, ["empty.txt", "empty"]),
])
def test_fit_refuses_bad_input_with_the_parts_error(sandbox, overrides, error, words):
    (sandbox.work / "empty.txt").write_text("")
    with pytest.raises(error) as refused:
        _fit(sandbox, **overrides)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message, (word, message)


def test_fit_refuses_a_sequence_longer_than_a_hugging_face_model_takes(sandbox):
    model = Bigram()
    model.config = type("Config", (), {"max_position_embeddings": 4, "vocab_size": 256})()
    with pytest.raises(ModelError, match="max_position_embeddings 4"):
        _fit(sandbox, model=model)


def _tiny_plan(cluster, seq_len=16):
    return expand_plan({"model": "tiny", "seq_len": seq_len, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 6]}]}]}, cluster)


def test_runtime_train_checks_before_spawning(sandbox, three_kinds):
    from hetrain.data.corpus import Corpus

    config = TrainConfig(model="tiny", steps=1)
    short = Corpus(torch.arange(10), "ten tokens")
    with pytest.raises(DataError, match="ten tokens: 10 tokens"):
        runtime_train(three_kinds, _tiny_plan(three_kinds), config, corpus=short)
    with pytest.raises(ModelError, match="max_seq_len 256"):
        runtime_train(three_kinds, _tiny_plan(three_kinds, 1000), config, corpus=short)
    with pytest.raises(ConfigError, match="time_scale: must be a finite number > 0"):
        runtime_train(three_kinds, _tiny_plan(three_kinds), config, time_scale=-1.0)
    blocker = sandbox.work / "f"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="out_dir"):
        runtime_train(three_kinds, _tiny_plan(three_kinds), config, out_dir=blocker)
    step = sandbox.work / "ckpt" / "step-000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"model": "small"}')
    resume = config.model_copy(update={"checkpoint_dir": str(step.parent), "resume": True})
    with pytest.raises(CheckpointError, match="holds model 'small'"):
        runtime_train(three_kinds, _tiny_plan(three_kinds), resume)
    assert not sandbox.spawned


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block and "hetrain.fit" in block.group(1)
    return block.group(1)


def _run_script(path, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_readme_example_runs_as_written_as_a_script(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    run = _run_script(script, ROOT)
    assert run.returncode == 0, run.stderr
    first, last = map(float, re.search(r"loss (\S+) -> (\S+)", run.stdout).groups())
    assert last < first


def test_script_without_main_guard_is_told_what_is_missing(tmp_path):
    # The README's example with its guard removed: the call now sits at the top level.
    code = _readme_example()
    head, guarded = code.split('if __name__ == "__main__":')
    body = textwrap.dedent(guarded.split("\n", 1)[1])
    script = tmp_path / "unguarded.py"
    script.write_text(head + body)
    run = _run_script(script, ROOT)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("hetrain.errors.ConfigError: ")
    assert "unguarded.py:" in last and 'if __name__ == "__main__":' in last
    assert "worker" not in run.stderr.replace("spawned workers", "")


def test_fit_errors_are_hetrain_errors():
    assert issubclass(ConfigError, HetrainError) and ConfigError.exit_code == 2


def test_a_model_without_sequence_pieces_refuses_a_plan_that_cuts_sequences(three_kinds):
    """Sequence chunks need attention that reads the earlier pieces' keys and values (the
    reference decoder's); a user's own module runs whole sequences."""
    from hetrain.errors import PlanError
    from hetrain.model.loading import load_model
    from hetrain.model.source import WholeModule
    from hetrain.runtime.preflight import check_model

    plan = expand_plan({"model": "tiny", "seq_len": 16, "seq_chunks": 2, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 1]}]}]}, three_kinds)
    with pytest.raises(PlanError, match="seq_chunks: model 'bigram' runs whole sequences"):
        check_model(plan, WholeModule(Bigram(), "bigram"))
    check_model(plan.model_copy(update={"seq_chunks": 1}), WholeModule(Bigram(), "bigram"))
    check_model(plan, load_model("tiny"))

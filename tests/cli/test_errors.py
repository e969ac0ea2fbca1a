"""Every bad input to `hetrain train` is refused before any work: one plain line on stderr
naming the field, exit 2 (1 for faults of the machine), no worker, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.errors import ClusterError, RuntimeFailure
from hetrain.runtime import launch
from tests.refusals import THREE, cli_refused

TRAIN = ["train", "--cluster", THREE, "--steps", "2", "--global-batch", "4", "--seq-len", "16",
         "--time-scale", "1e-9"]
PLAN_HEAD = "model: tiny\nseq_len: 16\n"


def _write(box, name: str, content: str | bytes):
    path = box.work / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x81",
                                     "nodes:\n  - {name: caf\xe9, kind: H100}\n".encode("latin-1")],
                         ids=["binary", "latin-1"])
def test_cluster_file_not_utf8(sandbox, content):
    path = _write(sandbox, "c.yaml", content)
    cli_refused(sandbox, ["train", "--cluster", str(path)], "c.yaml", "not UTF-8")


@pytest.mark.parametrize("content", [b"\x00\x01\x02\xff\xfe\xfd" * 10,
                                     (PLAN_HEAD + "# caf\xe9\n").encode("latin-1")],
                         ids=["binary", "latin-1"])
def test_plan_file_not_utf8(sandbox, content):
    path = _write(sandbox, "p.yaml", content)
    cli_refused(sandbox, [*TRAIN, "--plan", str(path)], "p.yaml", "not UTF-8")


@pytest.mark.parametrize("value", ["-1", "0", "inf", "-inf", "nan"])
def test_learning_rate_finite_and_positive(sandbox, value):
    cli_refused(sandbox, [*TRAIN, "--lr", value], "--lr", "finite number > 0")


@pytest.mark.parametrize("value", ["0", "-2", "inf"])
def test_time_scale_positive(sandbox, value):
    cli_refused(sandbox, [*TRAIN, "--time-scale", value], "--time-scale", "> 0")


def test_seq_len_above_the_models_maximum(sandbox):
    cli_refused(sandbox, [*TRAIN, "--seq-len", "1000"], "--seq-len 1000", "max_seq_len 256")


def test_seq_len_above_the_models_maximum_in_a_plan(sandbox):
    plan = _write(sandbox, "p.yaml", "model: tiny\nseq_len: 1000\npipelines:\n"
                  "  - {micro_batches: 2, stages: [{kind: H100, layers: [0, 6]}]}\n")
    cli_refused(sandbox, [*TRAIN, "--plan", str(plan)], "seq_len 1000", "max_seq_len 256")


def test_spec_only_model_is_refused_before_building_it(sandbox):
    cli_refused(sandbox, [*TRAIN, "--model", "llama-7b"], "llama-7b", "spec-only")


def test_empty_data_file(sandbox):
    data = _write(sandbox, "empty.txt", "")
    cli_refused(sandbox, [*TRAIN, "--data", str(data)], "empty.txt", "empty")


def test_corpus_shorter_than_one_sample(sandbox):
    data = _write(sandbox, "short.txt", "just a few words")
    cli_refused(sandbox, [*TRAIN, "--data", str(data)], "short.txt", "16 tokens",
                "seq_len + 2 = 18")


def test_missing_data_file(sandbox):
    cli_refused(sandbox, [*TRAIN, "--data", "nowhere.txt"], "nowhere.txt", "cannot read")


@pytest.mark.parametrize("body, field", [
    ("pipelines: 5\n", "pipelines"),
    ("pipelines: [{micro_batches: 2, stages: 3}]\n", "pipelines[0].stages"),
    ("pipelines: [{micro_batches: two, stages: [{kind: H100, layers: [0, 6]}]}]\n",
     "pipelines[0].micro_batches"),
    ("pipelines: [{micro_batches: 2, stages: [{kind: H100, tp: 0, layers: [0, 6]}]}]\n",
     "pipelines[0].stages[0].tp"),
    ("mesh: [1, 2]\n", "mesh"),
    ("data_parallel: {kind: H100}\n", "data_parallel"),
    ("data_parallel: [{kind: H100, samples: 4, layers: [0, 6], colour: red}]\n",
     "data_parallel[0].colour"),
])
def test_malformed_shorthand_names_the_field(sandbox, body, field):
    plan = _write(sandbox, "p.yaml", PLAN_HEAD + body)
    cli_refused(sandbox, [*TRAIN, "--plan", str(plan)], f"p.yaml: {field}:")


def test_micro_batch_size_zero_names_micro_batch_size(sandbox):
    plan = _write(sandbox, "p.yaml", PLAN_HEAD + "micro_batch_size: 0\npipelines:\n"
                  "  - {micro_batches: 2, stages: [{kind: H100, layers: [0, 6]}]}\n")
    line = cli_refused(sandbox, [*TRAIN, "--plan", str(plan)], "micro_batch_size")
    assert "global_batch" not in line
    per_route = _write(sandbox, "q.yaml", PLAN_HEAD + "pipelines:\n  - {micro_batches: 2, "
                       "micro_batch_size: 0, stages: [{kind: H100, layers: [0, 6]}]}\n")
    line = cli_refused(sandbox, [*TRAIN, "--plan", str(per_route)],
                       "pipelines[0].micro_batch_size")
    assert "global_batch" not in line


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_unwritable_output_file_is_refused_before_any_work(sandbox, option):
    blocker = _write(sandbox, "a-file", "x")
    cli_refused(sandbox, [*TRAIN, option, str(blocker / "out.json")], option, "is a file")
    cli_refused(sandbox, [*TRAIN, option, str(sandbox.work)], option, "is a folder")


def test_unwritable_out_dir_is_refused(sandbox):
    blocker = _write(sandbox, "a-file", "x")
    cli_refused(sandbox, [*TRAIN, "--out-dir", str(blocker)], "--out-dir", "is a file")


def test_read_only_checkpoint_dir(sandbox, monkeypatch):
    # Tests run as root here, where chmod cannot make a folder read-only: deny it to
    # os.access (what the check asks) instead.
    ckpt = sandbox.work / "ckpt"
    ckpt.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if str(p) == str(ckpt) else real(p, mode))
    cli_refused(sandbox, [*TRAIN, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"],
                "--checkpoint-dir", "not writable")


def test_error_text_with_markup_brackets_is_printed_verbatim(sandbox):
    # gloo's and our messages hold paths like `x[/y]`, which rich would read as a closing tag.
    blocker = _write(sandbox, "f[", "x")
    line = cli_refused(sandbox, [*TRAIN, "--checkpoint-dir", f"{blocker}/ckpt]"],
                       "--checkpoint-dir")
    assert f"{blocker}/ckpt]" in line


def test_checkpoint_of_another_model_is_refused_before_spawning(sandbox):
    step = sandbox.work / "ckpt" / "step-000003"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"model": "small", "step": 3}))
    cli_refused(sandbox, [*TRAIN, "--checkpoint-dir", str(sandbox.work / "ckpt"), "--resume"],
                "holds model 'small'", "'tiny'")


def test_huge_node_count_is_refused_with_the_limit(sandbox):
    path = _write(sandbox, "c.yaml", "nodes:\n  - {name: a, kind: H100, count: 1000000000}\n")
    cli_refused(sandbox, ["train", "--cluster", str(path)], "nodes:", "1,000,000,000",
                "limit of 65,536")


def test_more_local_workers_than_the_machine_holds(sandbox, monkeypatch):
    cpus = _write(sandbox, "cpus.yaml", "nodes:\n  - {name: c, kind: cpu, count: 4}\n")
    monkeypatch.setenv("HETRAIN_MAX_LOCAL_WORKERS", "2")
    cli_refused(sandbox, [*TRAIN, "--cluster", str(cpus)], "4 devices", "limit of 2",
                "HETRAIN_MAX_LOCAL_WORKERS")


def test_too_many_tokens_per_step(sandbox):
    cli_refused(sandbox, [*TRAIN, "--global-batch", "100000000"], "--global-batch", "limit")


def test_bad_option_value_is_one_line(sandbox):
    cli_refused(sandbox, [*TRAIN, "--lr", "fast"], "--lr")
    cli_refused(sandbox, ["train"], "--cluster")


def test_faults_of_the_machine_exit_1(sandbox, monkeypatch):
    def lost(job, ctx, progress, *_):
        raise RuntimeFailure("worker 1 (br104:0) died with exit code -9; the other workers "
                             "were stopped", lost_devices=["br104:0"])

    monkeypatch.setattr(launch, "_spawn_and_wait", lost)
    cli_refused(sandbox, TRAIN, "worker 1 (br104:0) died", code=1)

    def disk_full(job, ctx, progress, *_):
        raise OSError(28, "No space left on device", "/data/run/rank0.pt")

    monkeypatch.setattr(launch, "_spawn_and_wait", disk_full)
    cli_refused(sandbox, TRAIN, "No space left on device", "/data/run/rank0.pt", code=1)


def test_a_bug_is_one_line_and_debug_shows_the_traceback(sandbox, monkeypatch):
    def bug(job, ctx, progress, *_):
        raise KeyError("stage")

    monkeypatch.setattr(launch, "_spawn_and_wait", bug)
    cli_refused(sandbox, TRAIN, "internal error", "KeyError", "--debug", code=1)
    result = CliRunner().invoke(app, ["--debug", "train", "--cluster", "missing.yaml"])
    assert isinstance(result.exception, ClusterError)


def _hetrain(*args: str, cwd) -> subprocess.CompletedProcess:
    code = "from hetrain.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    ro = tmp_path / "f["
    ro.write_text("x")
    for args in (["train", "--cluster", "bin.yaml"],
                 ["train", "--cluster", THREE, "--checkpoint-dir", "f[/ckpt]"]):
        run = _hetrain(*args, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error: ")
        assert "Traceback" not in run.stderr and run.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.yaml", "f["]
    run = _hetrain("--debug", "train", "--cluster", "bin.yaml", cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" in run.stderr and "ClusterError" in run.stderr


@pytest.mark.parametrize("args, option", [
    (["plan", "--cluster", THREE, "--model", "tiny", "--out", "{bad}"], "--out"),
    (["plan", "--cluster", THREE, "--model", "tiny", "--json", "{bad}"], "--json"),
    (["simulate", "--cluster", THREE, "--model", "tiny", "--png", "{bad}"], "--png"),
    (["simulate", "--cluster", THREE, "--model", "tiny", "--trace", "{bad}"], "--trace"),
    (["profile", "--model", "tiny", "--out", "{bad}"], "--out"),
    (["export", "--checkpoint", "ckpt", "--out", "{bad}"], "--out"),
    (["bench", "dp", "--cluster", THREE, "--json", "{bad}"], "--json"),
    (["bench", "recovery", "--json", "{bad}"], "--json"),
])
def test_every_command_checks_its_output_paths_first(sandbox, args, option):
    blocker = _write(sandbox, "a-file", "x")
    args = [a.replace("{bad}", str(blocker / "out")) for a in args]
    cli_refused(sandbox, args, option, "is a file")


@pytest.mark.parametrize("option", [["--resume"], ["--checkpoint-every", "2"]])
def test_checkpoint_options_without_a_folder(sandbox, option):
    cli_refused(sandbox, [*TRAIN, *option], option[0], "needs --checkpoint-dir")


def test_seed_within_torchs_range(sandbox):
    cli_refused(sandbox, [*TRAIN, "--seed", str(2**70)], "--seed", "2**32")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_where_the_file_system_refuses_creation(sandbox):
    # /proc passes os.access for root, yet nothing can be created in it: found by trying.
    cli_refused(sandbox, [*TRAIN, "--json", "/proc/hetrain-test/out.json"], "--json",
                "cannot create anything under /proc")

"""`hetrain train --config job.toml`: the job file's sections, flags over them, the planner's
plan by default (shown, saved beside the run), and the checks made before any worker starts
(exit 2, one line, no worker, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.cost.model import CostModel
from hetrain.data.corpus import Corpus
from hetrain.errors import DataError, PlannerError
from hetrain.model.loading import load_model
from hetrain.plan import load_plan
from hetrain.planner.search import SearchOptions, search_plan
from hetrain.runtime import TrainConfig, run_training
from hetrain.runtime.job_config import load_job
from tests.conftest import EXAMPLES, ROOT
from tests.refusals import THREE, Reached, cli_refused, sandboxed

JOB = EXAMPLES / "jobs" / "three-kinds.toml"
MIXED = str(EXAMPLES / "clusters" / "test-mixed.yaml")
FAST = ["--time-scale", "1e-9", "--steps", "2"]  # no calibration: spawning comes at once


def _reach(tmp_path, args):
    """Run `hetrain args` up to the spawn of the workers; the CLI's result and the job the
    workers would have received."""
    with sandboxed(tmp_path / "box", Reached) as box:
        result = CliRunner().invoke(app, args)
    assert result.exit_code == Reached.exit_code, (result.output, result.exception)
    (job,) = box.spawned
    return result, job, box


def _job_file(box, text, name="job.toml"):
    path = box.work / name
    path.write_text(text)
    return str(path)


def test_the_example_job_file_drives_the_run_and_flags_override_it(tmp_path):
    example = load_job(JOB)  # its paths are from the repository's root, as `make demo` runs
    assert (ROOT / example.cluster.path).exists() and example.schedule.steps == 30
    # (the run below is in a sandbox folder: the cluster is given as a flag)
    result, job, _ = _reach(tmp_path, ["train", "--config", str(JOB), "--cluster", THREE,
                                       *FAST, "--lr", "0.01", "--no-search"])
    assert job.config.steps == 2 and job.config.lr == 0.01  # flags
    assert job.config.model == "tiny" and job.plan.global_batch == 48  # the file
    assert job.plan.seq_len == 64 and {"H100", "BR104", "A100-80GB"} == set(job.plan.kinds())
    assert "data parallelism" in result.stdout


def test_a_yaml_job_file_is_read_like_toml(tmp_path):
    with sandboxed(tmp_path / "w", Reached) as box:
        path = _job_file(box, f"cluster: {{path: {THREE}}}\nplan: {{global_batch: 6, "
                         "seq_len: 16, search: false}\nschedule: {steps: 3}\n", "job.yaml")
        result = CliRunner().invoke(app, ["train", "--config", path, "--time-scale", "1e-9"])
    assert result.exit_code == Reached.exit_code, result.output
    (job,) = box.spawned
    assert (job.config.steps, job.plan.global_batch, job.plan.seq_len) == (3, 6, 16)


@pytest.mark.parametrize("text, words", [
    ("[optimizer]\nlr = -1.0\n", ["job.toml", "optimizer.lr", "finite number > 0", "-1.0"]),
    ("[optimiser]\nlr = 0.1\n", ["unknown section [optimiser]", "optimizer"]),
    ("[schedule]\nstep = 3\n", ["schedule.step", "unknown field", "steps"]),
    ("[schedule]\nsteps = 0\n", ["schedule.steps", "whole number of steps >= 1"]),
    ("[plan]\nglobal_batch = \"48\"\n", ["plan.global_batch", "whole number"]),
    ("[schedule]\nprecision = \"fp8\"\n", ["schedule.precision", "float64, bf16 or fp16"]),
    ("[optimizer]\nlr_schedule = \"linear\"\n", ["optimizer.lr_schedule", "cosine"]),
    ("[schedule\nsteps = 3\n", ["job.toml", "not valid TOML"]),
    ("optimizer = 3\n", ["[optimizer] must be a table"]),
])
def test_a_bad_job_file_is_one_line_naming_section_and_field(sandbox, text, words):
    path = _job_file(sandbox, text)
    cli_refused(sandbox, ["train", "--config", path, "--cluster", THREE], *words)


def test_a_flag_over_the_job_file_is_named_as_the_flag(sandbox):
    path = _job_file(sandbox, "[optimizer]\nlr = 0.1\n")
    cli_refused(sandbox, ["train", "--config", path, "--cluster", THREE, "--lr", "inf"],
                "--lr", "finite number > 0")


def test_a_missing_job_file_and_a_missing_cluster_are_one_line(sandbox):
    cli_refused(sandbox, ["train", "--config", "nowhere.toml"], "nowhere.toml", "no such file")
    cli_refused(sandbox, ["train"], "--cluster", "[cluster]")


def test_without_a_plan_the_planner_plans_and_the_plan_is_saved_beside_the_run(tmp_path):
    out = tmp_path / "run"
    result, job, _ = _reach(tmp_path, ["train", "--cluster", THREE, *FAST, "--global-batch",
                                       "16", "--seq-len", "16", "--out-dir", str(out)])
    tiny = load_model("tiny")
    cost = CostModel(job.cluster, tiny.spec(16))
    want = search_plan(job.cluster, cost, 16, SearchOptions(tp_sizes=tiny.tp_sizes())).plan
    assert job.plan == want
    assert load_plan(out / "plan.json", job.cluster) == want
    assert "the planner's plan" in result.stdout and "plan.json" in result.stdout


def test_a_failing_planner_is_one_line_and_data_parallelism_runs(tmp_path, monkeypatch):
    def no_plan(*_args, **_kwargs):
        raise PlannerError("no plan fits the memory of any kind")

    monkeypatch.setattr("hetrain.training.search_plan", no_plan)
    result, job, _ = _reach(tmp_path, ["train", "--cluster", THREE, *FAST])
    line = "planner: no plan fits the memory of any kind; training data parallelism instead"
    assert line in result.stdout.replace("\n", " ")
    assert len(job.plan.devices()) == 3  # every device holds the whole model
    assert all(tuple(g.layers) == (0, 6) for g in job.plan.stage_groups)


def test_the_plan_table_names_devices_left_without_samples(tmp_path):
    result, job, _ = _reach(tmp_path, ["train", "--cluster", MIXED, *FAST, "--global-batch",
                                       "3", "--seq-len", "16", "--no-search"])
    assert len(job.plan.devices()) <= 3
    text = " ".join(result.stdout.split())
    assert "no samples for" in text and "global batch 3 is smaller than the 10 devices" in text


# --- checked before any worker starts --------------------------------------------------------
def test_a_sequence_longer_than_the_models_positions_in_the_job_file(sandbox):
    path = _job_file(sandbox, f"[cluster]\npath = \"{THREE}\"\n[plan]\nseq_len = 300\n")
    cli_refused(sandbox, ["train", "--config", path], "300", "max_seq_len 256",
                "--seq-len 256 or less")


def test_a_corpus_shorter_than_one_sample_in_the_job_file(sandbox):
    (sandbox.work / "short.txt").write_text("a few words")
    path = _job_file(sandbox, f"[cluster]\npath = \"{THREE}\"\n[data]\npath = \"short.txt\"\n"
                     "[plan]\nseq_len = 16\nsearch = false\n")
    cli_refused(sandbox, ["train", "--config", path], "short.txt", "11 tokens",
                "seq_len + 2 = 18")


def test_token_ids_beyond_the_vocabulary_are_refused_before_spawning(sandbox, three_kinds):
    from hetrain.planner.data_parallel import data_parallel_plan

    plan = data_parallel_plan(three_kinds, CostModel(three_kinds, load_model("tiny").spec(16)),
                              6)
    corpus = Corpus(torch.arange(1000) % 300, "ids to 299")
    before = sandbox.snapshot()
    with pytest.raises(DataError) as refused:
        run_training(three_kinds, plan, TrainConfig(model="tiny", steps=1), corpus=corpus)
    assert "token id 299" in str(refused.value) and "vocabulary of 256" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not sandbox.spawned and sandbox.snapshot() == before


@pytest.mark.slow
def test_a_job_file_trains_and_its_json_holds_every_attempt(tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "job.toml"
    path.write_text(f"[cluster]\npath = \"{THREE}\"\ntime_scale = 1e-9\n[plan]\n"
                    f"global_batch = 4\nseq_len = 16\n[schedule]\nsteps = 2\n[logging]\n"
                    f"json_file = \"{tmp_path / 'run.json'}\"\nout_dir = \"{out}\"\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run.json").read_text())
    assert len(summary["losses"]) == 2 and summary["recoveries"] == []
    assert [a["first_step"] for a in summary["attempts"]] == [0]
    assert (out / "plan.json").exists()

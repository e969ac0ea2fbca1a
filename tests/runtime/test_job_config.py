"""The job's sections: their defaults are the runtime's, `hetrain.fit` takes them (a JobConfig,
a dict, a file, or section keywords) with its flat keywords over them, and a bad value is
one line naming the section.field."""

from __future__ import annotations

import pytest
import torch

import hetrain
from hetrain.errors import ConfigError
from hetrain.runtime import TrainConfig
from hetrain.runtime.job_config import JobConfig, OptimizerSection, job_from_dict
from tests.refusals import THREE, Reached, sandboxed
from tests.runtime.test_preflight import Bigram


def test_the_sections_defaults_are_the_runtimes():
    assert JobConfig().train_config() == TrainConfig()
    recipe = OptimizerSection()  # the training recipe's fields, at their defaults
    assert (recipe.warmup_steps, recipe.lr_schedule, recipe.min_lr, recipe.grad_clip) == \
        (0, "constant", 0.0, None)


def test_values_replace_fields_and_errors_name_the_given_name():
    job = JobConfig().with_values({"optimizer.lr": 0.5, "schedule.steps": 7})
    assert (job.optimizer.lr, job.schedule.steps) == (0.5, 7)
    with pytest.raises(ConfigError, match=r"^--lr: a learning rate"):
        job.with_values({"optimizer.lr": 0.0}, {"optimizer.lr": "--lr"})
    with pytest.raises(ConfigError, match=r"^job: checkpoint\.every: pass 0"):
        job_from_dict({"checkpoint": {"every": -1}}, "job")


def _fit_reaching_spawn(tmp_path, **kwargs):
    """hetrain.fit up to the spawn of its workers; the job they would have received."""
    with sandboxed(tmp_path, Reached) as box, pytest.raises(Reached):
        hetrain.fit(Bigram(), torch.arange(400) % 256, time_scale=1e-9, **kwargs)
    (job,) = box.spawned
    return job


def test_fit_takes_the_job_in_sections_with_keywords_over_them(tmp_path):
    job_file = tmp_path / "job.toml"
    job_file.write_text(f"[cluster]\npath = \"{THREE}\"\n[plan]\nglobal_batch = 6\n"
                        "seq_len = 8\n[schedule]\nsteps = 5\n[optimizer]\nlr = 0.2\n")
    job = _fit_reaching_spawn(tmp_path / "a", job=str(job_file), lr=0.3,
                              optimizer={"weight_decay": 0.1}, schedule={"seed": 4})
    assert (job.config.steps, job.config.lr, job.config.weight_decay, job.config.seed) == \
        (5, 0.3, 0.1, 4)
    assert (job.plan.global_batch, job.plan.seq_len) == (6, 8)
    again = _fit_reaching_spawn(tmp_path / "b", cluster=THREE, job=JobConfig(),
                                plan={"global_batch": 3, "seq_len": 8})
    assert again.plan.global_batch == 3 and again.config.model == "Bigram"


@pytest.mark.parametrize("kwargs, words", [
    ({"job": {"optimizer": {"lr": -1}}}, ["job: optimizer.lr", "finite number > 0"]),
    ({"job": {"optimiser": {}}}, ["unknown section [optimiser]"]),
    ({"schedul": {"steps": 1}}, ["schedul: unknown keyword"]),
    ({"optimizer": 0.1}, ["optimizer: a dict"]),
    ({"job": 3}, ["job must be"]),
    ({"schedule": {"steps": "many"}}, ["steps: pass a whole number"]),
])
def test_fit_refuses_bad_sections_in_one_line(sandbox, kwargs, words):
    with pytest.raises(ConfigError) as refused:
        hetrain.fit(Bigram(), torch.arange(400) % 256, cluster=THREE, **kwargs)
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not sandbox.spawned

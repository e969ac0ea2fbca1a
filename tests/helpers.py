"""Shared test helpers: run a plan across gloo worker processes and compare with one process."""

from __future__ import annotations

import socket

import torch

from hetrain.data.corpus import Corpus, default_corpus
from hetrain.runtime import TrainConfig, train
from hetrain.runtime.reference import train_reference

_CORPUS: Corpus | None = None


def small_corpus() -> Corpus:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = default_corpus(seed=0, max_bytes=200_000)
    return _CORPUS


def run_plan(cluster, plan, steps=3, time_scale=1e-9, model=None, precision="float64",
             faults=None, **cfg):
    """Train `plan` for `steps` in worker processes (bounded time; always cleaned up).
    A tiny time_scale: emulated kinds are not slowed down, tests only check maths."""
    config = TrainConfig(model=plan.model, steps=steps, op_timeout_s=60, run_timeout_s=240,
                         precision=precision,
                         **cfg)
    return train(cluster, plan, config, model=model, corpus=small_corpus(),
                 time_scale=time_scale, faults=faults)


def assert_matches_reference(result, steps=3, model=None, rtol=1e-5, precision="float64",
                             **cfg):
    config = TrainConfig(model=result.plan.model, steps=steps, precision=precision, **cfg)
    ref, losses = train_reference(config, small_corpus(), result.plan.global_batch,
                                  result.plan.seq_len, model=model)
    ref = {k: v for k, v in ref.items() if k != "head.out.weight" or k in result.params}
    assert set(result.params) == set(ref), set(result.params) ^ set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(result.params[name], want, rtol=rtol, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(losses), rtol=1e-5,
                               atol=1e-6)


def make_config(model, steps, precision="float64", **cfg):
    """A TrainConfig for multi-process tests: bounded op and run timeouts."""
    return TrainConfig(model=model, steps=steps, precision=precision,
                       **{"op_timeout_s": 60, "run_timeout_s": 240, **cfg})


def assert_params_match_reference(params, model, steps, global_batch, seq_len, losses=None,
                                  rtol=1e-5, precision="float64", **cfg):
    """`params` (and, when given, the losses of the last len(losses) steps) equal one-process
    training for `steps`: for runs that resumed from a checkpoint or ran under several plans.
    `cfg`: more TrainConfig fields (the recipe)."""
    config = TrainConfig(model=model, steps=steps, precision=precision, **cfg)
    ref, ref_losses = train_reference(config, small_corpus(), global_batch, seq_len)
    ref = {k: v for k, v in ref.items() if k != "head.out.weight" or k in params}
    assert set(params) == set(ref), set(params) ^ set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(params[name], want, rtol=rtol, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    if losses:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[-len(losses):]),
                                   rtol=1e-5, atol=1e-6)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

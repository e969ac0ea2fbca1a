"""Fuzzed inputs to `hetrain train` and `hetrain.fit`: random bytes, wrong types, out-of-range
numbers, missing and extra fields, mutated valid cluster and plan files. Every case ends in
either a refusal (exit 2 / a HetrainError: one line, no traceback, no worker, nothing written)
or, for an input that happens to be valid, at the spawn of the workers (stood in for here).

CI runs HETRAIN_FUZZ_EXAMPLES (default 50) cases per test, the same ones each run; a longer,
random run: `pytest tests/cli/test_fuzz.py --fuzz-examples 2000`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import hetrain
from hetrain.cli.main import app
from hetrain.errors import HetrainError
from tests.refusals import FUZZ_COUNTS, THREE, Reached, sandboxed

EXAMPLES = int(os.environ.get("HETRAIN_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="HETRAIN_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CLUSTER = yaml.safe_load(Path(THREE).read_text())
USER_KINDS = {"kinds": [{"name": "acme-x1", "vendor": "acme", "backend": "gloo",
                         "flops": {"bf16": 1e14, "fp32": 1e13}, "memory_gib": 16,
                         "memory_bandwidth_gbps": 500}],
              "nodes": [{"name": "n0", "kind": "acme-x1", "count": 2},
                        {"name": "n1", "kind": "910b", "replicas": 2}],
              "links": {"inter_node_gbps": 10, "bridge_gbps": 5}}
PLANS = [
    {"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 4]},
                                        {"kind": "BR104", "layers": [4, 6]}]}]},
    {"model": "tiny", "seq_len": 16, "n_layers": 6, "data_parallel": [
        {"kind": "H100", "samples": 4}, {"device": "a100:0", "samples": 2}]},
    {"model": "tiny", "seq_len": 16, "mesh": {"micro_batches": 2, "stages": [
        {"kind": "H100", "layers": [0, 3]}, {"kind": "BR104", "dp": 1, "layers": [3, 6]}]}},
    {"model": "tiny", "seq_len": 16, "global_batch": 4, "stage_groups": [
        {"name": "a", "kind": "H100", "devices": ["h100:0"], "layers": [0, 6]}],
     "routes": [{"stages": ["a"], "micro_batches": 2, "micro_batch_size": 2}]},
]
# Values users get wrong: zero, negatives, huge counts, NaN, wrong types, markup brackets.
ODD = st.sampled_from([0, -1, 1, 2, 3, 10**9, 2**63, -(2**63), 1.5, -0.0, float("nan"),
                       float("inf"), "x", "", None, True, [], {}, [1, 2], {"a": 1}, "H100",
                       "[/x]", "fp8", [0, 6], [6, 0]])
SCALAR = st.one_of(ODD, st.integers(-10, 10), st.text(max_size=8),
                   st.floats(allow_nan=True, allow_infinity=True))
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
OPTION = st.one_of(st.sampled_from(["-1", "0", "1", "2", "inf", "-inf", "nan", "1e400", "abc",
                                    "", "1e-3", "64", "300", "3.5", "-0", "[/x]",
                                    "99999999999999999999"]),
                   st.integers(-5, 300).map(str))
RUN = ["--steps", "1", "--global-batch", "4", "--seq-len", "16", "--time-scale", "1e-9"]


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw, base: Any) -> Any:
    """`base` with one to three fields replaced by odd values, deleted, or added."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(tree)))
        op = draw(st.sampled_from(["replace", "delete", "extra"]))
        value = copy.deepcopy(draw(VALUE))  # ODD's lists are shared: never grow them
        if not path:
            tree = value if op == "replace" else tree
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        if op == "replace":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(max_size=6))] = value
        elif isinstance(parent[path[-1]], list):
            parent[path[-1]].append(value)
        if not isinstance(tree, dict | list):
            break
    return tree


def _dump(tree: Any, as_json: bool) -> bytes:
    if as_json:
        return json.dumps(tree, default=str).encode()
    return yaml.safe_dump(tree, allow_unicode=True).encode()


def file_contents(base: Any) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=120),
        st.text(max_size=120).map(str.encode),
        st.tuples(VALUE, st.booleans()).map(lambda v: _dump(*v)),
        st.tuples(mutated(base), st.booleans()).map(lambda v: _dump(*v)),
    )


def _cli_case(kind: str, args: list[str], files: dict[str, bytes]) -> None:
    """Run one generated command line and check how it ended."""
    with tempfile.TemporaryDirectory() as root, sandboxed(Path(root), Reached) as box:
        for name, data in files.items():
            (box.work / name).write_bytes(data)
        before = box.snapshot()
        result = CliRunner().invoke(app, args)
        lines = result.stderr.splitlines()
        assert result.exit_code in (2, Reached.exit_code), (args, files, result.output,
                                                             result.exception)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, files, result.stderr)
        assert "Traceback" not in result.output
        if result.exit_code == 2:  # refused: before any output, worker or file
            assert not box.spawned and result.stdout == "", (args, files)
            assert box.snapshot() == before, (args, files)
    _count(kind, result.exit_code == 2)


def _count(kind: str, refused: bool) -> None:
    key = f"{kind} {'refused' if refused else 'valid'}"
    FUZZ_COUNTS[key] = FUZZ_COUNTS.get(key, 0) + 1


DATA = b"def fuzz(x):\n    return x + 1\n" * 20


@FUZZ
@given(content=st.sampled_from([CLUSTER, USER_KINDS]).flatmap(file_contents))
def test_fuzzed_cluster_files(content):
    _cli_case("cluster", ["train", "--cluster", "c.yaml", "--data", "d.txt", *RUN],
              {"c.yaml": content, "d.txt": DATA})


@FUZZ
@given(plan=st.sampled_from(PLANS).flatmap(file_contents), suffix=st.sampled_from(["yaml",
                                                                                   "json"]))
def test_fuzzed_plan_files(plan, suffix):
    _cli_case("plan", ["train", "--cluster", THREE, "--plan", f"p.{suffix}", "--data", "d.txt",
                       *RUN], {f"p.{suffix}": plan, "d.txt": DATA})


@FUZZ
@given(options=st.dictionaries(
    st.sampled_from(["--lr", "--time-scale", "--steps", "--global-batch", "--seq-len",
                     "--model", "--checkpoint-every", "--seed", "--json", "--out-dir",
                     "--checkpoint-dir"]), OPTION, min_size=1, max_size=4),
       data=st.one_of(st.just(DATA), st.binary(max_size=80)))
def test_fuzzed_options_and_data(options, data):
    args = ["train", "--cluster", THREE, "--data", "d.txt", *RUN]
    for option, value in options.items():
        args += [option, value]
    _cli_case("options", args, {"d.txt": data})


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(256, 4), nn.Linear(4, 256)

    def forward(self, tokens):
        return self.out(self.embed(tokens))


TOKENS = torch.arange(400) % 256
FIT_DATA = st.one_of(
    st.just(TOKENS),
    st.lists(st.integers(-3, 300), max_size=60).map(torch.tensor),
    st.lists(st.floats(-1, 1), min_size=1, max_size=30).map(torch.tensor),
    st.sampled_from([b"bytes", "missing.txt", 3, [1, 2, 3]]),
)


@FUZZ
@given(kwargs=st.dictionaries(
    st.sampled_from(["lr", "steps", "global_batch", "seq_len", "time_scale", "weight_decay",
                     "seed", "precision"]), SCALAR, max_size=3),
       data=FIT_DATA, cluster=st.one_of(st.just(THREE), mutated(CLUSTER), mutated(USER_KINDS),
                                        VALUE))
def test_fuzzed_fit(kwargs, data, cluster):
    args = {"steps": 1, "global_batch": 4, "seq_len": 16, "time_scale": 1e-9, **kwargs}
    with tempfile.TemporaryDirectory() as root, sandboxed(Path(root), Reached) as box:
        if isinstance(cluster, dict):
            (box.work / "c.yaml").write_text(yaml.safe_dump(cluster))
            cluster = "c.yaml"
        before = box.snapshot()
        refused = False
        try:
            hetrain.fit(Bigram(), data, cluster=cluster, **args)
        except Reached:
            pass
        except HetrainError as err:
            assert len(str(err).splitlines()) == 1, str(err)
            assert not box.spawned, (args, cluster)
            assert box.snapshot() == before
            refused = True
    _count("fit", refused)

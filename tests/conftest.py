"""Shared fixtures: example files, and a skip for GPU tests without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def three_kinds():
    from hetrain.cluster import load_cluster

    return load_cluster(EXAMPLES / "clusters" / "three-kinds.yaml")


@pytest.fixture
def mixed_1024():
    from hetrain.cluster import load_cluster

    return load_cluster(EXAMPLES / "clusters" / "mixed-1024.yaml")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working and a temporary folder to check nothing is written; spawning is refused."""
    from tests.refusals import make_sandbox

    return make_sandbox(tmp_path, monkeypatch)


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="generated cases per fuzz test (default: HETRAIN_FUZZ_EXAMPLES, or "
                     "a bounded number for CI)")


def pytest_terminal_summary(terminalreporter):
    from tests.refusals import FUZZ_COUNTS

    if FUZZ_COUNTS:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_COUNTS.items()))
        terminalreporter.write_line(f"fuzz: {sum(FUZZ_COUNTS.values())} generated cases "
                                    f"({parts})")


def pytest_configure(config):
    # Read when the fuzz tests are imported (hypothesis settings are fixed at decoration).
    n = config.getoption("--fuzz-examples", default=None)
    if n is not None:
        import os

        os.environ["HETRAIN_FUZZ_EXAMPLES"] = str(n)

"""Untrusted checkpoints: a `.metadata` pickle that would run code is refused by name, and the
code does not run; genuine DCP metadata still loads."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from typer.testing import CliRunner

from hetrain.errors import CheckpointError
from hetrain.runtime.checkpoint import FORMAT, MANIFEST, META, read_model, step_dir
from hetrain.runtime.safe_load import load_metadata


def write_checkpoint(root, step=2):
    """A committed checkpoint folder as the runtime writes it (one writer, no collective)."""
    path = step_dir(root, step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model/w": torch.arange(6.0).reshape(2, 3)},
                 storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    (path / META).write_text(json.dumps({"format": FORMAT, "step": step, "model": "tiny",
                                         "seed": 0, "precision": "float32", "plan": {}}))
    seal(path, step)
    return path


def seal(path, step):
    """A manifest matching the files: what an attacker crafting the folder would write."""
    files = {p.name: {"bytes": p.stat().st_size,
                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}))


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_genuine_metadata_loads(tmp_path):
    params, meta = read_model(write_checkpoint(tmp_path))
    torch.testing.assert_close(params["w"], torch.arange(6.0).reshape(2, 3))
    assert meta["step"] == 2


def test_code_running_metadata_is_refused_and_does_not_run(tmp_path):
    path = write_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    seal(path, 2)  # the checksums agree: they do not stop a crafted folder
    with pytest.raises(CheckpointError, match=r"\.metadata names builtins\.exec"):
        read_model(path)
    assert not marker.exists()

    from hetrain.cli.main import app

    run = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path),
                                   "--out", str(tmp_path / "m.safetensors")])
    assert run.exit_code == 2 and "builtins.exec" in run.output
    assert len(run.output.strip().splitlines()) == 1
    assert not marker.exists()
    # The payload is real: an unrestricted load runs it.
    pickle.loads((path / ".metadata").read_bytes())
    assert marker.read_text() == "ran"


def test_metadata_naming_files_outside_the_folder_is_refused(tmp_path):
    path = write_checkpoint(tmp_path)
    metadata = load_metadata(path / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_metadata(path / ".metadata")

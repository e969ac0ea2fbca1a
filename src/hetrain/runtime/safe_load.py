"""Read a checkpoint's DCP `.metadata` without running code: a restricted unpickler that
admits only the metadata types `torch.distributed.checkpoint` writes for tensors.

`FileSystemReader.read_metadata` calls `pickle.load` on `.metadata`: a crafted checkpoint
folder (the SHA-256 manifest beside it can be crafted too) would run any code it names on
`--resume` or `hetrain export`. `SafeReader` reads it through `MetadataUnpickler` instead,
which refuses every global outside the short list below, by name.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from hetrain.errors import CheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
# (module, name) pairs a DCP checkpoint of tensors pickles, and nothing that could run code:
# dataclasses and an enum filled by BUILD, and constructors of plain values.
_ALLOWED = {
    (_METADATA, "Metadata"), (_METADATA, "TensorStorageMetadata"),
    (_METADATA, "TensorProperties"), (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "MetadataIndex"), (_METADATA, "StorageMeta"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickler admitting only DCP tensor-metadata types and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_metadata(path: Path) -> Metadata:
    """The DCP metadata in file `path`; CheckpointError naming what it refused."""
    where = f"checkpoint {path.parent} refused: file {path.name}"
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{where} is unreadable ({err.strerror})") from None
    try:
        metadata = MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{where} names {err}, which is not checkpoint metadata (a "
                              "pickle that could run code); it was not loaded") from None
    except Exception as err:  # noqa: BLE001 - any malformed pickle is one refusal
        raise CheckpointError(f"{where} is not checkpoint metadata ({type(err).__name__})"
                              ) from None
    _check_shape(metadata, path)
    return metadata


def _check_shape(metadata: Any, path: Path) -> None:
    """Tensors only (DCP loads byte entries with an unrestricted torch.load), and data files
    inside the checkpoint folder."""
    where = f"checkpoint {path.parent} refused: file {path.name}"
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{where} does not hold DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{where}: entry {key!r} is not a tensor")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{where}: data file {name!r} is outside the checkpoint")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by `load_metadata` (tensor data is already read
    with torch.load(weights_only=True) by DCP)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.folder = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = load_metadata(self.folder / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

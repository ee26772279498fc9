"""What the client's uploads send: multipart ``file`` bodies of safetensors bytes (never a pickle).

``Client.upload_model``, ``upload_dataset`` and ``upload_artifact`` build their bodies here. torch
and safetensors are imported inside the functions that need them, so importing this module stays
light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import BocompressError

Files = Callable[[], dict[str, Any]]
"""A function returning httpx ``files`` for a multipart body (called anew for each attempt)."""


def model_files(module_or_path: Any) -> Files:
    """The body of ``upload_model``: a ``.safetensors`` file as is, or a module's / dict's tensors."""
    if isinstance(module_or_path, (str, os.PathLike)):
        return _file_factory(Path(module_or_path))
    return bytes_files(_safetensors_bytes(_state_dict(module_or_path)), "model.safetensors")


def dataset_files(tensor_or_path: Any, labels: Any = None) -> Files:
    """The body of ``upload_dataset`` (see there): a safetensors file as is, else the inputs (a
    tensor or array stored as ``inputs``, or a dict of named inputs) and optional ``labels``."""
    if isinstance(tensor_or_path, (str, os.PathLike)):
        if labels is not None:
            raise BocompressError("labels go inside the safetensors file when uploading a path")
        return _file_factory(Path(tensor_or_path))
    import torch

    if isinstance(tensor_or_path, Mapping):  # named inputs: input_ids, attention_mask...
        tensors = {str(k): torch.as_tensor(v) for k, v in tensor_or_path.items()}
        first = next(iter(tensors.values()), None)
        tensors["inputs"] = first if first is not None else torch.empty(0)
        named = True
    else:
        tensors = {"inputs": torch.as_tensor(tensor_or_path)}
        named = False
    if labels is not None:
        tensors["labels"] = torch.as_tensor(labels)
        if tensors["labels"].shape[:1] != tensors["inputs"].shape[:1]:
            raise BocompressError(
                f"labels ({tuple(tensors['labels'].shape)}) and inputs "
                f"({tuple(tensors['inputs'].shape)}) differ in their first dimension"
            )
    if named:
        del tensors["inputs"]
    return bytes_files(_safetensors_bytes(tensors), "dataset.safetensors")


def _state_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return dict(obj.state_dict())
    raise BocompressError(
        f"upload_model takes an nn.Module, a dict of tensors or a file path, not {type(obj).__name__}"
    )


def _safetensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    """Serialize tensors with safetensors (no pickle). Shared or strided storage is copied first."""
    import torch
    from safetensors.torch import save

    out = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise BocompressError(f"{name!r} is a {type(value).__name__}, not a tensor")
        out[name] = value.detach().cpu().clone().contiguous()
    return save(out)


def _file_factory(path: Path) -> Files:
    if not path.is_file():
        raise BocompressError(f"no such file: {path}")

    def files() -> dict[str, Any]:
        return {"file": (path.name, path.read_bytes(), "application/octet-stream")}

    return files


def bytes_files(payload: bytes, filename: str) -> Files:
    """A multipart body of one file named ``filename`` holding ``payload``."""
    def files() -> dict[str, Any]:
        return {"file": (filename, payload, "application/octet-stream")}

    return files


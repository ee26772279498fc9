"""Model inputs and outputs as models have them: one tensor or a dict of tensors in, any output out.

Every piece of the worker that slices a calibration set, moves it to a device, calls a model or
reads its output goes through these functions, so a model that takes ``input_ids`` and
``attention_mask`` (a HuggingFace classifier) and one that takes an image batch share one path.

* An *input batch* is a :class:`torch.Tensor` (``N x ...``, float or integer) or a mapping of names
  to tensors that share their first dimension (``{"input_ids": N x T, "attention_mask": N x T}``).
  A mapping is passed to the model as keyword arguments.
* A model's *output* may be a tensor, a tuple or list (the first element is distilled unless a key
  says otherwise), a dict or a ``ModelOutput`` (``logits`` by default). :func:`select_output`
  picks the tensor to distill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "BatchError",
    "DEFAULT_OUTPUT",
    "n_samples",
    "take",
    "head",
    "to_device",
    "call",
    "select_output",
    "forward",
    "iter_batches",
]

#: One input batch: a tensor, or named tensors sharing the first (sample) dimension.
Batch = Union[Tensor, Mapping[str, Tensor]]

#: The output distilled by default when a model returns a dict or a ``ModelOutput``.
DEFAULT_OUTPUT = "logits"


class BatchError(ValueError):
    """An input batch or a model output that cannot be used as asked (the message says why)."""


def n_samples(x: Batch) -> int:
    """The number of samples (first dimension) of a batch; a dict's tensors must agree on it."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise BatchError("an input batch must have a sample dimension, got a 0-d tensor")
        return int(x.shape[0])
    if not isinstance(x, Mapping) or not x:
        raise BatchError(f"an input batch is a tensor or a non-empty dict of tensors, got {type(x).__name__}")
    sizes = {}
    for k, v in x.items():
        if not isinstance(v, Tensor) or v.dim() == 0:
            raise BatchError(f"input {k!r} must be a tensor with a sample dimension")
        sizes[k] = int(v.shape[0])
    if len(set(sizes.values())) != 1:
        raise BatchError(f"the inputs disagree on the number of samples: {sizes}")
    return next(iter(sizes.values()))


def take(x: Batch, index: slice | Tensor | Sequence[int]) -> Batch:
    """The samples of ``x`` at ``index`` (a slice, or an index tensor/list), for every input."""
    if isinstance(x, Tensor):
        return x[index]
    return {k: v[index] for k, v in x.items()}


def head(x: Batch, n: int) -> Batch:
    """The first ``n`` samples of ``x``."""
    return take(x, slice(0, int(n)))


def to_device(x: Batch, device: torch.device | str, non_blocking: bool = True) -> Batch:
    """``x`` on ``device`` (dtypes kept: token ids stay integers)."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    return {k: v.to(device, non_blocking=non_blocking) for k, v in x.items()}


def contiguous(x: Batch) -> Batch:
    """``x`` with every tensor contiguous."""
    if isinstance(x, Tensor):
        return x.contiguous()
    return {k: v.contiguous() for k, v in x.items()}


def call(model: nn.Module, x: Batch) -> Any:
    """``model(x)`` for a tensor batch, ``model(**x)`` for a dict batch; the raw output."""
    if isinstance(x, Tensor):
        return model(x)
    return model(**x)


def select_output(out: Any, key: str | int | None = None) -> Tensor:
    """The tensor to distill from a model's output.

    Args:
        out: a tensor; a tuple/list; a dict; or an object with attributes (``ModelOutput``).
        key: which part: a name for dicts and ``ModelOutput`` (default :data:`DEFAULT_OUTPUT`), an
            index for tuples (default 0). Ignored for a plain tensor.

    Raises:
        BatchError: the output has no such part, or the part is not a tensor (names what it has).
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and not hasattr(out, "keys"):
        idx = 0 if key is None else key
        if not isinstance(idx, int):
            raise BatchError(f"the model returns a {type(out).__name__}; choose its output by index, not {key!r}")
        if not -len(out) <= idx < len(out):
            raise BatchError(f"the model returns {len(out)} outputs; output index {idx} does not exist")
        part = out[idx]
    elif isinstance(out, Mapping) or hasattr(out, "keys"):
        name = DEFAULT_OUTPUT if key is None else key
        keys = list(out.keys())
        if isinstance(name, int):
            if not -len(keys) <= name < len(keys):
                raise BatchError(f"the model's output has parts {keys}; index {name} does not exist")
            name = keys[name]
        if name not in keys:
            raise BatchError(f"the model's output has no part {name!r}; it has {keys} (set the job's output key)")
        part = out[name]
    else:
        raise BatchError(f"cannot distill a model output of type {type(out).__name__}")
    if not isinstance(part, Tensor):
        raise BatchError(f"the chosen model output ({key!r}) is a {type(part).__name__}, not a tensor")
    return part


def forward(model: nn.Module, x: Batch, key: str | int | None = None) -> Tensor:
    """``select_output(call(model, x), key)``."""
    return select_output(call(model, x), key)


def iter_batches(x: Batch, batch_size: int):  # noqa: ANN201 - a generator of (slice, Batch)
    """``(slice, batch)`` pairs over ``x`` in chunks of ``batch_size`` samples."""
    if batch_size < 1:
        raise BatchError(f"batch_size must be >= 1, got {batch_size}")
    n = n_samples(x)
    for i in range(0, n, batch_size):
        s = slice(i, min(i + batch_size, n))
        yield s, take(x, s)

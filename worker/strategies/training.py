"""What the training strategies share: option errors, cancellation, labelled data, one training loop.

Both strategies (:mod:`bocompress.worker.strategies.chipnet`, :mod:`bocompress.worker.strategies.retrain`) train a copy
of a model for many steps, report ``progress(frac, message)`` and check ``should_stop()`` before
every step, so a cancel stops the work within one step and raises :class:`Cancelled` before
anything is returned (the caller's model is never modified).

Training data is either a pair of tensors ``(inputs, labels)`` (shuffled and batched here, seeded)
or any re-iterable of ``(inputs, labels)`` batches, such as a ``torch.utils.data.DataLoader``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "Cancelled",
    "Data",
    "OptionError",
    "Progress",
    "ShouldStop",
    "TrainData",
    "Ticker",
    "accuracy",
    "apply_masks",
    "decay_groups",
    "recalibrate_bn",
    "check_positive_int",
    "count_params",
    "flops_per_sample",
    "zero_masks",
]

#: ``progress(frac, message)``: ``frac`` in ``[0, 1]`` of the whole task.
Progress = Callable[[float, str], None]
#: ``should_stop()``: True when the task must stop now (checked before every training step).
ShouldStop = Callable[[], bool]
#: Training data: ``(inputs, labels)`` tensors, or a re-iterable of ``(inputs, labels)`` batches.
Data = tuple[Tensor, Tensor | None] | Iterable[Any]


class OptionError(ValueError):
    """A bad option of a strategy, found before any work starts.

    Attributes:
        field: the name of the offending option (``budget``, ``budget_type``, ``epochs``, ``model``,
            ``train_data``, ...), so a service can answer a 4xx that names it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Cancelled(Exception):
    """The task was asked to stop (``should_stop()`` returned True); nothing was returned or kept.

    Attributes:
        epoch: the epoch (0-based) that was running.
        step: the steps done in that epoch.
    """

    def __init__(self, where: str, epoch: int, step: int) -> None:
        super().__init__(f"{where} cancelled at epoch {epoch + 1}, step {step}: nothing kept")
        self.epoch = epoch
        self.step = step


def check_positive_int(field: str, value: Any) -> int:
    """``value`` as an int ``>= 1``, else :class:`OptionError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise OptionError(field, f"must be an integer >= 1, got {value!r}")
    return int(value)


class TrainData:
    """Labelled (or unlabelled) training batches, from tensors or from a loader.

    Args:
        data: ``(inputs, labels)`` tensors (``N x ...`` and ``N`` int64, labels may be None) or a
            re-iterable of ``(inputs, labels)`` batches (a DataLoader); a batch that is a bare tensor
            or ``(inputs, None)`` has no labels.
        batch_size: batch size when ``data`` are tensors.
        seed: seed of the per-epoch shuffling of tensors.
        field: the option name used in errors.

    Raises:
        OptionError: no data, or inputs and labels of different lengths.
    """

    def __init__(self, data: Data, batch_size: int = 32, seed: int = 0, field: str = "train_data") -> None:
        self.field = field
        self.batch_size = check_positive_int("batch_size", batch_size)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._tensors: tuple[Tensor, Tensor | None] | None = None
        self._loader: Iterable[Any] | None = None
        if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
            x, y = data[0], data[1]
            if len(x) == 0:
                raise OptionError(field, "is empty")
            if y is not None and (not isinstance(y, Tensor) or len(y) != len(x)):
                raise OptionError(field, f"labels must be a tensor of {len(x)} entries, got {type(y).__name__}")
            self._tensors = (x, y)
        elif isinstance(data, Tensor):
            if len(data) == 0:
                raise OptionError(field, "is empty")
            self._tensors = (data, None)
        elif isinstance(data, Iterable):
            self._loader = data
        else:
            raise OptionError(field, f"must be (inputs, labels) tensors or an iterable of batches, got {type(data).__name__}")
        first = self._first()
        self.example = first[0][:1]
        self.has_labels = first[1] is not None

    @staticmethod
    def _split(batch: Any, field: str) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, tuple | list) and len(batch) >= 1 and isinstance(batch[0], Tensor):
            y = batch[1] if len(batch) > 1 else None
            return batch[0], (y if isinstance(y, Tensor) else None)
        raise OptionError(field, f"a batch must be (inputs, labels), got {type(batch).__name__}")

    def _first(self) -> tuple[Tensor, Tensor | None]:
        if self._tensors is not None:
            return self._tensors[0][:1], (None if self._tensors[1] is None else self._tensors[1][:1])
        it = iter(self._loader)  # type: ignore[arg-type]
        try:
            return self._split(next(it), self.field)
        except StopIteration:
            raise OptionError(self.field, "yields no batches") from None

    def require_labels(self, why: str) -> None:
        """Raise :class:`OptionError` when the data have no labels (``why`` says who needs them)."""
        if not self.has_labels:
            raise OptionError(self.field, f"has no labels; {why} needs labelled training data")

    def steps_per_epoch(self) -> int | None:
        """Batches per epoch (None for a loader without ``len``)."""
        if self._tensors is not None:
            return math.ceil(len(self._tensors[0]) / self.batch_size)
        try:
            return len(self._loader)  # type: ignore[arg-type]
        except TypeError:
            return None

    def epoch(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """One pass over the data: ``(inputs, labels or None)`` batches (tensors: a fresh shuffle)."""
        if self._tensors is not None:
            x, y = self._tensors
            perm = torch.randperm(len(x), generator=self._gen)
            for i in range(0, len(perm), self.batch_size):
                idx = perm[i : i + self.batch_size].to(x.device)
                yield x[idx], (None if y is None else y[idx.to(y.device)])
            return
        for batch in self._loader:  # type: ignore[union-attr]
            yield self._split(batch, self.field)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor], device: torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (in place; eval mode after).

    The statistics are reset and then averaged over all the batches (``momentum=None``): a pruned
    or re-scaled network's BatchNorms see other inputs than the ones their statistics came from.

    Returns:
        The number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for xb in batches:
            model(xb if device is None else xb.to(device))
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return n


def count_params(model: nn.Module) -> int:
    """The number of parameters (``numel`` summed), the convention of the layer tables."""
    return int(sum(p.numel() for p in model.parameters()))


def flops_per_sample(model: nn.Module, example: Tensor) -> float:
    """FLOPs of one forward pass of one sample, as :class:`FlopCounterMode` counts them (eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(example[:1])
    finally:
        for m, t in flags:
            m.training = t
    return float(counter.get_total_flops())


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on inputs ``N x ...`` and labels ``N`` (eval mode; flags restored)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        hits = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                   for i in range(0, len(x), batch_size))
    finally:
        for m, t in flags:
            m.training = t
    return hits / len(x)


def zero_masks(model: nn.Module) -> dict[str, Tensor]:
    """Masks of the weight tensors (dim > 1) that hold exact zeros (an unstructured pruning's zeros).

    Training keeps them zero (``p.mul_(mask)`` after each step) so the compressed cost does not change.
    """
    return {n: (p != 0) for n, p in model.named_parameters() if p.dim() > 1 and bool((p == 0).any())}


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the masked weights again (after an optimizer step)."""
    if not masks:
        return
    with torch.no_grad():
        for n, p in model.named_parameters():
            mk = masks.get(n)
            if mk is not None:
                p.mul_(mk)


@dataclass
class Ticker:
    """Progress and cancellation over a known (or estimated) number of steps.

    Attributes:
        where: the task's name in messages (``chipnet``, ``retrain scratch-b``).
        total: the steps of the whole task (an estimate when a loader has no ``len``).
        progress: the caller's callback (or None).
        should_stop: the caller's callback (or None).
        done: steps done so far.
    """

    where: str
    total: int
    progress: Progress | None = None
    should_stop: ShouldStop | None = None
    done: int = 0

    def check(self, epoch: int, step: int) -> None:
        """Raise :class:`Cancelled` when ``should_stop()`` says so."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(self.where, epoch, step)

    def step(self, message: str) -> None:
        """One step done: report the fraction."""
        self.done += 1
        self.report(message)

    def report(self, message: str) -> None:
        """Report the current fraction with ``message``."""
        if self.progress is not None:
            self.progress(min(1.0, self.done / max(1, self.total)), message)


def decay_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on weights (dim > 1) only, none on biases and norms."""
    decay = [p for _, p in params if p.dim() > 1]
    other = [p for _, p in params if p.dim() <= 1]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups

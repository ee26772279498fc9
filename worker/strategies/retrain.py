"""Retraining a found architecture (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019).

Four modes of :func:`retrain`, each on a copy of the compressed model:

* ``finetune-distill``: keep the compressed weights; minimise the relative squared L2 distance of
  the logits to the original model's, ``mean|f(x) - f*(x)|^2 / mean|f*(x)|^2`` over each batch (the
  project's distillation loss ``L``, scale-free so one learning rate fits every model); labels are
  not needed.
* ``finetune-labels``: keep the compressed weights; cross-entropy on labels.
  Both fine-tunes first re-estimate the BatchNorm statistics on a few training batches (the
  compressed model's were the original's), then use SGD with momentum 0.9 at ``lr`` (Liu et al.:
  40 epochs at 1e-3).
* ``scratch-e``: re-initialise the compressed architecture and train it from labels for the
  original's epochs ``E`` (``original_epochs``).
* ``scratch-b``: the same for the same compute: ``ceil(E * F_full / F_pruned)`` epochs, with ``F``
  the FLOPs per sample of the original and of the compressed model (:func:`scratch_b_epochs`).
  Scratch training uses the zoo's deep-model recipe: SGD with Nesterov momentum 0.9 at
  ``scratch_lr``, a one-epoch linear warm-up then a per-step cosine to zero.

Re-initialisation (:func:`reinitialize`): every module's own ``reset_parameters`` (seeded), then
Kaiming-normal (``fan_out``, ReLU) for convolutions and unit weights / zero biases for BatchNorms, the
init the zoo's CIFAR-style models use. Weights the compressed model holds at exactly zero (an
unstructured pruning's mask) stay zero in every mode, so the compressed cost never changes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bocompress.worker.strategies.training import (
    Data,
    OptionError,
    Progress,
    ShouldStop,
    Ticker,
    TrainData,
    accuracy,
    apply_masks,
    check_positive_int,
    decay_groups,
    flops_per_sample,
    recalibrate_bn,
    zero_masks,
)

__all__ = ["MODES", "RetrainConfig", "RetrainResult", "reinitialize", "retrain", "scratch_b_epochs"]

#: The retraining modes.
MODES = ("finetune-distill", "finetune-labels", "scratch-e", "scratch-b")


@dataclass(frozen=True)
class RetrainConfig:
    """Options of :func:`retrain`.

    Attributes:
        epochs: fine-tuning epochs (the two ``finetune-*`` modes; Liu et al.: 40).
        lr: fine-tuning learning rate (SGD, momentum 0.9; Liu et al.: 1e-3).
        original_epochs: ``E``, the epochs the original model was trained for (the scratch modes;
            the zoo's ``resnet20`` was trained for 30, ``mobilenet`` for 40).
        scratch_lr: peak learning rate of scratch training (SGD, Nesterov momentum 0.9).
        weight_decay: on weights (dim > 1) only.
        batch_size: when the training data are tensors.
        bn_batches: the fine-tune modes first re-estimate the BatchNorm statistics of the compressed
            model on this many training batches (its BatchNorms saw the original's inputs; 0: no).
        seed: seeds the re-initialisation and the batch order.
    """

    epochs: int = 40
    lr: float = 1e-3
    original_epochs: int = 30
    scratch_lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 64
    bn_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("original_epochs", self.original_epochs)
        check_positive_int("batch_size", self.batch_size)
        for name in ("lr", "scratch_lr"):
            if not float(getattr(self, name)) > 0:
                raise OptionError(name, f"must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.bn_batches, bool) or int(self.bn_batches) != self.bn_batches or self.bn_batches < 0:
            raise OptionError("bn_batches", f"must be an integer >= 0, got {self.bn_batches!r}")
        if float(self.weight_decay) < 0:
            raise OptionError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")


@dataclass
class RetrainResult:
    """What :func:`retrain` returns.

    Attributes:
        model: the retrained model (eval mode), the compressed architecture.
        mode: the mode run.
        epochs: the epochs trained.
        flops_ratio: FLOPs per sample of the compressed model over the original's.
        history: one dict per epoch: ``epoch``, ``loss`` (training mean), ``val_accuracy`` (None
            without validation data), ``seconds``.
        val_accuracy: the final model's validation accuracy (None without validation data).
        seconds: wall time of the call.
    """

    model: nn.Module
    mode: str
    epochs: int
    flops_ratio: float
    history: list[dict[str, Any]] = field(default_factory=list)
    val_accuracy: float | None = None
    seconds: float = 0.0


def scratch_b_epochs(original_epochs: int, full_flops: float, pruned_flops: float) -> int:
    """Scratch-B's epochs: the original's compute, ``ceil(E * F_full / F_pruned)`` epochs (at least 1).

    Args:
        original_epochs: ``E``.
        full_flops: FLOPs per sample of the original model.
        pruned_flops: FLOPs per sample of the compressed model.
    """
    if not pruned_flops > 0 or not full_flops > 0:
        raise OptionError("compressed_model", f"FLOPs must be positive, got {full_flops} and {pruned_flops}")
    return max(1, math.ceil(original_epochs * full_flops / pruned_flops - 1e-9))


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` in place (seeded): ``reset_parameters``, then the CIFAR-style init.

    Convolutions get Kaiming-normal (``fan_out``, ReLU) weights and zero biases; BatchNorms unit
    weights, zero biases and fresh running statistics; other modules their own ``reset_parameters``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                if m.track_running_stats:
                    m.reset_running_stats()
    return model


def _inputs(train: TrainData, n: int, ticker: Ticker) -> Iterator[Tensor]:
    """The inputs of up to ``n`` training batches (cancel checked before each)."""
    for i, (xb, _) in enumerate(train.epoch()):
        if i >= n:
            return
        ticker.check(0, 0)
        yield xb


def retrain(
    compressed_model: nn.Module,
    original_model: nn.Module,
    mode: str,
    data: Data,
    config: RetrainConfig | None = None,
    val_data: tuple[Tensor, Tensor] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> RetrainResult:
    """Fine-tune or retrain from scratch a compressed architecture (on a copy).

    Args:
        compressed_model: the found architecture with its compressed weights (left untouched).
        original_model: the original model: the teacher of ``finetune-distill``, the FLOPs
            reference of ``scratch-b`` (left untouched).
        mode: one of :data:`MODES`.
        data: training data: ``(inputs, labels)`` tensors or an iterable of ``(inputs, labels)``
            batches; labels may be missing only for ``finetune-distill``.
        config: the options.
        val_data: optional ``(inputs, labels)`` measured after every epoch.
        progress: ``progress(frac, message)`` after every step.
        should_stop: checked before every step; True stops with :class:`~bocompress.worker.strategies.Cancelled`.

    Returns:
        The :class:`RetrainResult`.

    Raises:
        OptionError: (a ValueError) unknown mode, bad config, data without labels for a mode that
            needs them.
        Cancelled: ``should_stop()`` returned True.
    """
    t_start = time.perf_counter()
    cfg = config or RetrainConfig()
    if not isinstance(cfg, RetrainConfig):
        raise OptionError("config", f"must be a RetrainConfig, got {type(cfg).__name__}")
    if mode not in MODES:
        raise OptionError("mode", f"unknown mode {mode!r}; known: {list(MODES)}")
    train = TrainData(data, cfg.batch_size, cfg.seed, field="data")
    if mode != "finetune-distill":
        train.require_labels(mode)
    if val_data is not None and not (
        isinstance(val_data, tuple | list) and len(val_data) == 2 and all(isinstance(v, Tensor) for v in val_data)
    ):
        raise OptionError("val_data", "must be (inputs, labels) tensors")

    device = next(compressed_model.parameters()).device
    example = train.example.to(device)
    full_flops = flops_per_sample(original_model, example)
    pruned_flops = flops_per_sample(compressed_model, example)
    flops_ratio = pruned_flops / full_flops if full_flops > 0 else 1.0
    if mode == "scratch-b":
        epochs = scratch_b_epochs(cfg.original_epochs, full_flops, pruned_flops)
    elif mode == "scratch-e":
        epochs = cfg.original_epochs
    else:
        epochs = cfg.epochs

    model = copy.deepcopy(compressed_model)
    masks = zero_masks(model)
    teacher = None
    if mode == "finetune-distill":
        teacher = copy.deepcopy(original_model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    groups = decay_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.weight_decay)
    per_epoch = train.steps_per_epoch() or 1
    total = epochs * per_epoch
    if mode.startswith("scratch"):
        reinitialize(model, cfg.seed)
        apply_masks(model, masks)
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.scratch_lr, momentum=0.9, nesterov=True)
        warm = min(per_epoch, total)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        sched: torch.optim.lr_scheduler.LRScheduler | None = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
        sched = None

    ticker = Ticker(f"retrain {mode}", total, progress, should_stop)
    if mode.startswith("finetune") and cfg.bn_batches:
        recalibrate_bn(model, _inputs(train, cfg.bn_batches, ticker), device)
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        model.train()
        running, n = 0.0, 0
        for step, (xb, yb) in enumerate(train.epoch()):
            ticker.check(epoch, step)
            xb = xb.to(device)
            out = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(xb)
                t = target.flatten(1)
                loss = (out.flatten(1) - t).pow(2).sum(1).mean() / t.pow(2).sum(1).mean().clamp_min(1e-12)
            else:
                loss = F.cross_entropy(out, yb.to(device))  # type: ignore[union-attr]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            apply_masks(model, masks)
            running += float(loss.detach()) * len(xb)
            n += len(xb)
            ticker.step(f"{mode} epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.4f}")
        ticker.check(epoch, per_epoch)
        acc = accuracy(model, val_data[0].to(device), val_data[1].to(device)) if val_data is not None else None
        history.append({"epoch": epoch, "loss": running / max(1, n), "val_accuracy": acc,
                        "seconds": time.perf_counter() - t_epoch})
        ticker.report(f"{mode} epoch {epoch + 1}/{epochs} done" + (f": validation accuracy {acc:.4f}" if acc is not None else ""))
    model.eval()
    return RetrainResult(
        model=model,
        mode=mode,
        epochs=epochs,
        flops_ratio=flops_ratio,
        history=history,
        val_accuracy=history[-1]["val_accuracy"] if history else None,
        seconds=time.perf_counter() - t_start,
    )

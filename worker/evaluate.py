"""Measure a compressed model: distillation error L with its standard error, and its cost ratio.

The fidelity is the paper's distillation (function-norm) loss, made relative:

    L = mean_i ||f~(x_i) - f*(x_i)||^2 / mean_i ||f*(x_i)||^2,

estimated on the calibration inputs, with ``sem = std_i(||f~(x_i) - f*(x_i)||^2) / sqrt(N)``
divided by the same denominator (the GP takes ``sem^2`` as observation noise). The cost ratio is
measured on the compressed module (``Compressor.count_cost``) and checked against the exact ratio
of the profile's cost forms: they must agree within 1%, else :class:`CostMismatch`.

How a trial is measured around this (calibration / held-out split, BatchNorm re-estimation,
fine-tuning, the sensitivity curves of a profile) is :mod:`bocompress.worker.proxy`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.costs import ratio as exact_ratio
from bocompress.worker import batch as B
from bocompress.worker.methods.base import Compressor, CostMismatch, eval_mode

__all__ = [
    "FLOPS_SAMPLES",
    "RATIO_TOLERANCE",
    "evaluate",
    "fidelity",
    "resolve_device",
    "teacher_outputs",
]


#: Largest relative difference allowed between the measured and the exact cost ratio.
RATIO_TOLERANCE = 0.01


#: Samples used for the FlopCounterMode pass (FLOPs are per sample; a few are enough).
FLOPS_SAMPLES = 2


def resolve_device(device: str | torch.device | None, module: nn.Module | None = None) -> torch.device:
    """``device`` as a torch.device; when None, the module's device (its first parameter) or cpu."""
    if device is not None:
        return torch.device(device)
    if module is not None:
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _outputs(model: nn.Module, inputs: B.Batch, batch_size: int, device: torch.device,
             output: str | int | None = None) -> Tensor:
    """Model outputs ``N x output shape`` (float32, on ``device``), computed batch by batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs = []
    with eval_mode(model), torch.no_grad():
        for _, xb in B.iter_batches(inputs, batch_size):
            outs.append(B.forward(model, B.to_device(xb, device), output).float())
    return torch.cat(outs)


def teacher_outputs(
    model: nn.Module, inputs: B.Batch, batch_size: int = 512, device: str | torch.device | None = None,
    output: str | int | None = None,
) -> Tensor:
    """The original model's outputs on the calibration inputs (the caller caches them per job).

    Args:
        model: the original network f*; moved to ``device`` in place (as ``nn.Module.to`` does).
        inputs: ``N x input shape``.
        batch_size: samples per forward pass.
        device: where to run (default: the model's device).
        output: which part of the model's output to distill (:func:`bocompress.worker.batch.select_output`).

    Returns:
        ``N x output shape`` float32 on ``device``.
    """
    dev = resolve_device(device, model)
    return _outputs(model.to(dev), inputs, batch_size, dev, output)


def fidelity(
    model: nn.Module,
    inputs: B.Batch,
    teacher_out: Tensor,
    labels: Tensor | None,
    batch_size: int = 512,
    device: torch.device | None = None,
    output: str | int | None = None,
) -> tuple[float, float, float | None]:
    """``(L, sem of L, accuracy or None)`` of ``model`` against the teacher outputs (eval mode, no grad).

    ``L = mean_i |f(x_i) - t_i|^2 / mean_i |t_i|^2``; ``sem = std_i(|f(x_i) - t_i|^2) / sqrt(N)`` over the
    same denominator.
    """
    n = B.n_samples(inputs)
    dev = device or resolve_device(None, model)
    err = torch.empty(n, dtype=torch.float64, device=dev)
    ref = torch.empty(n, dtype=torch.float64, device=dev)
    correct = 0
    with eval_mode(model), torch.no_grad():
        for s, xb in B.iter_batches(inputs, batch_size):
            out = B.forward(model, B.to_device(xb, dev), output).double().flatten(1)
            t = teacher_out[s].to(dev).double().flatten(1)
            err[s] = (out - t).pow(2).sum(1)
            ref[s] = t.pow(2).sum(1)
            if labels is not None:
                correct += int((out.argmax(1) == labels[s].to(dev)).sum())
    denom = float(ref.mean())
    if denom <= 0:
        raise ValueError("the original model's outputs are all zero: the relative distillation error is undefined")
    l2 = float(err.mean()) / denom
    sem = (float(err.std(unbiased=True)) / math.sqrt(n) / denom) if n > 1 else 0.0
    return l2, sem, (correct / n if labels is not None else None)


def evaluate(
    compressor: Compressor,
    compressed: nn.Module,
    inputs: Tensor,
    teacher_out: Tensor,
    labels: Tensor | None,
    theta: Mapping[str, float],
    cost_kind: str = "params",
    batch_size: int = 512,
    device: str | torch.device | None = None,
    check_all: bool = False,
    output: str | int | None = None,
) -> dict[str, dict[str, float]]:
    """Fidelity, cost and task metrics of one compressed model.

    Args:
        compressor: the job's compressor (its profile gives the exact ratio and totals).
        compressed: ``compressor.apply(theta)``.
        inputs: calibration inputs ``N x input shape``.
        teacher_out: :func:`teacher_outputs` of the original on ``inputs`` (``N x output shape``).
        labels: ``N`` class labels, or None (then no accuracy).
        theta: the trial's parameters (search-parameter name -> value).
        cost_kind: the job's cost (``params``, ``flops``, or a kind the method measures).
        batch_size: samples per forward pass.
        device: where to run (default: the compressed model's device).
        check_all: also measure FLOPs (a FlopCounterMode pass, several forward passes' worth of
            time on a GPU) when the job's cost is not ``flops``; by default the ``flops`` value
            then comes from the profile's exact form.
        output: which part of the model's output to distill (:func:`bocompress.worker.batch.select_output`).

    Returns:
        ``{"values": {...}, "sem": {...}}`` with values ``distill_l2``, ``ratio`` (measured),
        ``ratio_exact`` (from the profile), ``ratio_params``, ``ratio_flops``, ``params``,
        ``flops`` (per sample; measured for a ``flops`` job or with ``check_all``), ``eval_seconds`` and, with labels, ``accuracy`` and
        ``accuracy_original``; sem holds ``distill_l2``.

    Raises:
        CostMismatch: measured and exact ratio differ by more than 1% of the exact one.
        ValueError: inputs, teacher outputs and labels disagree in length.
    """
    t0 = time.perf_counter()
    n = B.n_samples(inputs)
    if n == 0 or len(teacher_out) != n or (labels is not None and len(labels) != n):
        raise ValueError(
            f"inputs ({n}), teacher outputs ({len(teacher_out)}) and labels "
            f"({None if labels is None else len(labels)}) must be non-empty and of one length"
        )
    dev = resolve_device(device, compressed)
    compressed = compressed.to(dev)
    l2, sem, acc = fidelity(compressed, inputs, teacher_out, labels, batch_size, dev, output)

    profile = compressor.profile()
    totals = profile["totals"]
    sample = B.to_device(B.head(inputs, min(FLOPS_SAMPLES, n)), dev)
    params = compressor.count_params(compressed)
    if cost_kind == "flops" or check_all:
        flops = compressor.count_flops(compressed, sample)
        measured: dict[str, float] = {"params": params / float(totals["params"]), "flops": flops / float(totals["flops"])}
    else:
        flops = exact_ratio(profile, theta, "flops") * float(totals["flops"])
        measured = {"params": params / float(totals["params"])}
    if cost_kind not in measured:
        if cost_kind not in totals:
            raise ValueError(f"cost kind {cost_kind!r} is not in the profile's totals {sorted(totals)}")
        measured[cost_kind] = compressor.count_cost(compressed, cost_kind, sample) / float(totals[cost_kind])
    r = measured[cost_kind]
    r_exact = exact_ratio(profile, theta, cost_kind)
    if abs(r - r_exact) > RATIO_TOLERANCE * abs(r_exact):
        raise CostMismatch(cost_kind, r, r_exact, f"method {compressor.method!r}")
    values: dict[str, Any] = {
        "distill_l2": l2,
        "ratio": r,
        "ratio_exact": r_exact,
        "ratio_params": measured["params"],
        "ratio_flops": flops / float(totals["flops"]),
        "params": float(params),
        "flops": float(flops),
    }
    if labels is not None:
        values["accuracy"] = float(acc)
        values["accuracy_original"] = float((teacher_out.flatten(1).argmax(1).cpu() == labels.cpu()).float().mean())
    values["eval_seconds"] = time.perf_counter() - t0
    return {"values": {k: float(v) for k, v in values.items()}, "sem": {"distill_l2": sem}}

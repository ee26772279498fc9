"""The proxy of a trial: what a worker does around :func:`bocompress.worker.evaluate.evaluate`.

A labelled job's data is split once into a calibration part (everything the search sees) and a
held-out part (``accuracy`` only; :func:`split_holdout`). A trial's compressed model may have its
BatchNorm statistics re-estimated downstream of the changed layers (:func:`recalibrate_bn`) and
be fine-tuned by distillation (:func:`distill_finetune`) before it is measured
(:func:`prepare`, :func:`measure_trial`); at profiling, :func:`job_profile` adds each layer's
measured L curve (:func:`sensitivity_curves`) to the layer table. See docs/proxy.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.worker import batch as B
from bocompress.worker.evaluate import evaluate, fidelity, resolve_device
from bocompress.worker.methods.base import Compressor, eval_mode, forward_hooked

__all__ = [
    "HOLDOUT_SEED",
    "Holdout",
    "ProxyOptions",
    "batchnorms_after",
    "distill_finetune",
    "job_profile",
    "measure_trial",
    "prepare",
    "recalibrate_bn",
    "sensitivity_curves",
    "sensitivity_grid",
    "split_holdout",
]


#: Seed of the calibration / held-out split (fixed: every worker of a job splits the same way).
HOLDOUT_SEED = 0


#: Sensitivity points measured per layer at profiling (besides theta = 1, where L = 0 exactly).
SENS_POINTS = (0.1, 0.2, 0.35, 0.5, 0.7, 0.85)


#: Most calibration samples used for the sensitivity curves.
SENS_SAMPLES = 256


@dataclass(frozen=True)
class ProxyOptions:
    """How a trial is measured (the job's ``compression`` fields of issue 13).

    Attributes:
        bn_recalibrate: re-estimate BatchNorm statistics on the calibration inputs after compressing.
        holdout_fraction: with labels, the seeded share of the data held out for ``accuracy`` only.
        finetune_steps: distillation steps (Adam) on the calibration inputs before measuring.
        finetune_lr: their learning rate.
        sensitivity: measure each layer's L curve at profiling.
        ls_correction: the methods' least-squares correction (None: each method's default).
    """

    bn_recalibrate: bool = True
    holdout_fraction: float = 0.3
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    sensitivity: bool = True
    ls_correction: bool | None = None

    @classmethod
    def from_spec(cls, comp: Mapping[str, Any]) -> "ProxyOptions":
        """From a job's ``compression`` dict (defaults for absent fields)."""
        d = cls()
        ls = comp.get("ls_correction", d.ls_correction)
        return cls(
            bn_recalibrate=bool(comp.get("bn_recalibrate", d.bn_recalibrate)),
            holdout_fraction=float(comp.get("holdout_fraction", d.holdout_fraction)),
            finetune_steps=int(comp.get("finetune_steps", d.finetune_steps)),
            finetune_lr=float(comp.get("finetune_lr", d.finetune_lr)),
            sensitivity=bool(comp.get("sensitivity", d.sensitivity)),
            ls_correction=None if ls is None else bool(ls),
        )


@dataclass
class Holdout:
    """The held-out part of a labelled job's data: inputs, labels and the original's outputs."""

    inputs: B.Batch
    labels: Tensor
    teacher: Tensor


def split_holdout(
    inputs: B.Batch, labels: Tensor | None, fraction: float, seed: int = HOLDOUT_SEED
) -> tuple[B.Batch, Tensor | None, B.Batch | None, Tensor | None]:
    """A seeded split into a calibration part (everything the search sees) and a held-out part.

    Args:
        inputs: ``N x ...`` (or a dict batch).
        labels: ``N`` labels, or None (then nothing is held out).
        fraction: the share held out (``round(N * fraction)``, at least 1 and at most ``N - 1``).
        seed: the split's seed.

    Returns:
        ``(calib_inputs, calib_labels, holdout_inputs, holdout_labels)``; the last two are None
        without labels, with ``fraction == 0`` or with fewer than 2 samples. Both parts keep
        the data's order.
    """
    n = B.n_samples(inputs)
    if labels is None or fraction <= 0 or n < 2:
        return inputs, labels, None, None
    n_hold = min(max(int(round(n * fraction)), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    hold = perm[:n_hold].sort().values
    calib = perm[n_hold:].sort().values
    return (B.contiguous(B.take(inputs, calib.to(_dev(inputs)))), labels[calib.to(labels.device)],
            B.contiguous(B.take(inputs, hold.to(_dev(inputs)))), labels[hold.to(labels.device)])


def _dev(x: B.Batch) -> torch.device:
    return x.device if isinstance(x, Tensor) else next(iter(x.values())).device


def _module_order(model: nn.Module, sample: B.Batch) -> list[str]:
    """Module names in the order they first run on one forward pass of ``sample``."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules() if n}
    seen: set[str] = set()

    def hook(mod: nn.Module, _args: Any) -> None:
        n = names.get(mod)
        if n is not None and n not in seen:
            seen.add(n)
            order.append(n)

    forward_hooked(model, sample, names, hook, pre=True)
    return order


def batchnorms_after(model: nn.Module, changed: Sequence[str], sample: B.Batch) -> list[str]:
    """The BatchNorm layers of ``model`` that run after the first changed module (forward order).

    Args:
        model: the compressed model.
        changed: names of the modules the compression changed (a factorized layer's name covers
            the factors inside it).
        sample: a small input batch (one forward pass, eval mode).

    Returns:
        BatchNorm module names (empty when nothing changed).
    """
    if not changed:
        return []
    order = _module_order(model, sample)
    prefixes = tuple(f"{c}." for c in changed)
    cset = set(changed)
    first = next((i for i, n in enumerate(order) if n in cset or n.startswith(prefixes)), None)
    if first is None:
        first = 0
    mods = dict(model.named_modules())
    bn_after = {n for n in order[first:] if isinstance(mods[n], nn.modules.batchnorm._BatchNorm)}
    # BatchNorm layers that never ran (unused) are left alone; the rest in module order
    return [n for n, m in model.named_modules() if n in bn_after and m.track_running_stats]


def recalibrate_bn(
    model: nn.Module, inputs: B.Batch, names: Sequence[str] | None = None, batch_size: int = 512,
    device: torch.device | None = None,
) -> int:
    """Re-estimate BatchNorm running statistics on ``inputs`` (adaptive BN, EagleEye, ECCV 2020).

    The chosen BatchNorm layers get their running mean/variance reset and re-estimated as the
    cumulative average over forward passes (``momentum = None``) with only those layers in train
    mode (nothing else changes: no dropout, no parameter update); the model ends in eval mode.

    Args:
        model: the compressed model (modified in place).
        inputs: calibration inputs.
        names: the BatchNorm layers to re-estimate (None: every BatchNorm with running stats).
        batch_size: samples per forward pass (one pass of all inputs when they fit: exact statistics).
        device: where to run (default: the model's).

    Returns:
        The number of BatchNorm layers re-estimated.
    """
    mods = dict(model.named_modules())
    if names is None:
        names = [n for n, m in mods.items() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    bns = [mods[n] for n in names]
    if not bns:
        return 0
    dev = device or resolve_device(None, model)
    saved = [bn.momentum for bn in bns]
    with eval_mode(model), torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        try:
            for _, xb in B.iter_batches(inputs, batch_size):
                if B.n_samples(xb) < 2 and len(bns):  # a batch of one has no variance
                    continue
                B.call(model, B.to_device(xb, dev))
        finally:
            for bn, mom in zip(bns, saved):
                bn.momentum = mom
    model.eval()
    return len(bns)


def distill_finetune(
    model: nn.Module, inputs: B.Batch, teacher_out: Tensor, steps: int, lr: float = 1e-4,
    batch_size: int = 64, seed: int = 0, device: torch.device | None = None, output: str | int | None = None,
) -> None:
    """``steps`` Adam steps on ``|f(x) - f*(x)|^2`` over random calibration batches (in place).

    BatchNorm layers stay in eval mode (their statistics are the re-estimated ones), and weights
    that a pruning method zeroed stay zero, so the cost does not change.
    """
    if steps <= 0:
        return
    dev = device or resolve_device(None, model)
    n = B.n_samples(inputs)
    gen = torch.Generator().manual_seed(int(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    masks = {id(p): (p != 0) for p in params if p.dim() > 1 and bool((p == 0).any())}
    opt = torch.optim.Adam(params, lr=lr)
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        for _ in range(int(steps)):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            xb = B.to_device(B.take(inputs, idx.to(_dev(inputs))), dev)
            out = B.forward(model, xb, output).float().flatten(1)
            loss = (out - teacher_out[idx.to(teacher_out.device)].to(dev).float().flatten(1)).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for p in params:
                        mk = masks.get(id(p))
                        if mk is not None:
                            p.mul_(mk)
    finally:
        for m, t in flags:
            m.training = t
    model.eval()


def prepare(
    compressor: Compressor, theta: Mapping[str, float], inputs: B.Batch, teacher_out: Tensor,
    options: ProxyOptions, batch_size: int = 512, device: torch.device | None = None,
    output: str | int | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """``compressor.apply(theta)`` (with the method's least squares), then the proxy's repairs.

    BatchNorm re-estimation on the calibration inputs, of the BatchNorm layers after the first
    module changed and not reconstructed by the method's least squares
    (``compressor.unrepaired_layers``; so an untouched model stays the original), and the
    optional distillation steps, then a second re-estimation when steps were taken.

    Returns:
        ``(model, seconds)``: the model ready to measure, on ``device``, and the time of each step
        (``apply_seconds``, ``bn_seconds``, ``finetune_seconds``).
    """
    t0 = time.perf_counter()
    model = compressor.apply(dict(theta))
    dev = device or resolve_device(None, model)
    model = model.to(dev)
    t1 = time.perf_counter()
    bns: list[str] = []
    if options.bn_recalibrate:
        changed = compressor.unrepaired_layers(theta)
        if changed:
            bns = batchnorms_after(model, changed, B.to_device(B.head(inputs, 1), dev))
            recalibrate_bn(model, inputs, bns, batch_size, dev)
    t2 = time.perf_counter()
    if options.finetune_steps > 0:
        distill_finetune(model, inputs, teacher_out, options.finetune_steps, options.finetune_lr, device=dev, output=output)
        if bns:
            recalibrate_bn(model, inputs, bns, batch_size, dev)
    t3 = time.perf_counter()
    secs = {"apply_seconds": t1 - t0, "bn_seconds": t2 - t1}
    if options.finetune_steps > 0:
        secs["finetune_seconds"] = t3 - t2
    return model, secs


def measure_trial(ctx: Any, theta: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """One trial of a job: compress, repair (LS, BN, fine-tune), measure.

    Args:
        ctx: the job's :class:`bocompress.worker.runtime.JobContext` (compressor, calibration inputs and
            teacher outputs, labels, the held-out part, the proxy options).
        theta: the trial's parameters.

    Returns:
        ``{"values", "sem"}`` as :func:`evaluate`, where ``distill_l2`` is measured after the
        repairs on the calibration part; with labels ``accuracy`` is on the HELD-OUT part,
        ``accuracy_calib`` on the calibration part, ``accuracy_original`` the original's held-out
        accuracy and ``distill_l2_holdout`` L on the held-out part; ``apply_seconds`` (compress +
        BN re-estimation + fine-tune, with ``bn_seconds`` and ``finetune_seconds`` its parts),
        ``measure_seconds`` and ``eval_seconds`` = their sum.
    """
    t0 = time.perf_counter()
    options: ProxyOptions = getattr(ctx, "proxy", None) or ProxyOptions()
    output = getattr(ctx, "output", None)
    bs = int(getattr(ctx, "batch_size", 512) or 512)
    model, secs = prepare(ctx.compressor, theta, ctx.inputs, ctx.teacher, options, bs, ctx.device, output)
    t1 = time.perf_counter()
    out = evaluate(ctx.compressor, model, ctx.inputs, ctx.teacher, ctx.labels, theta, cost_kind=ctx.cost_kind,
                   batch_size=bs, device=ctx.device, output=output)
    values = out["values"]
    hold: Holdout | None = getattr(ctx, "holdout", None)
    if ctx.labels is not None:
        values["accuracy_calib"] = values["accuracy"]
    if hold is not None:
        l2h, _, acc = fidelity(model, hold.inputs, hold.teacher, hold.labels, bs, ctx.device, output)
        values["accuracy"] = float(acc)
        values["accuracy_original"] = _accuracy(hold.teacher, hold.labels)
        values["distill_l2_holdout"] = l2h
    t2 = time.perf_counter()
    values.update(secs)
    # the two parts of a trial: building the compressed model (compress, BN re-estimation, any
    # fine-tune: ``apply_seconds``, with ``bn_seconds``/``finetune_seconds`` inside it) and measuring it
    values["apply_seconds"] = t1 - t0
    values["measure_seconds"] = t2 - t1
    values["eval_seconds"] = t2 - t0
    out["values"] = {k: float(v) for k, v in values.items()}
    return out


def _accuracy(outputs: Tensor, labels: Tensor) -> float:
    return float((outputs.flatten(1).argmax(1).cpu() == labels.cpu()).float().mean())


def sensitivity_grid(theta_min: float, points: Sequence[float] = SENS_POINTS) -> list[float]:
    """The thetas of a layer's sensitivity curve: theta_min, the default points above it, and 1.0 (at most 8)."""
    grid = [float(theta_min)] + [float(t) for t in points if theta_min < t < 1.0] + [1.0]
    return grid[:7] + [1.0] if len(grid) > 8 else grid


def job_profile(ctx: Any) -> dict:
    """The layer table a profiling task reports: the compressor's, plus what needs the data.

    ``model_info`` gets ``n_outputs`` (width of the distilled output), ``n_calibration``,
    ``n_holdout`` and, with labels, ``chance_accuracy`` and ``accuracy_original`` (held out).
    With ``options.sensitivity`` each search parameter's row gets ``sens_grid`` / ``sensitivity``:
    L (after the same repairs as a trial) of the model with only that parameter below 1, made
    non-increasing in theta; points where nothing changes are exactly 0 and not run.
    """
    prof = ctx.compressor.profile()
    info = prof["model_info"]
    options: ProxyOptions = getattr(ctx, "proxy", None) or ProxyOptions()
    hold: Holdout | None = getattr(ctx, "holdout", None)
    n_out = int(ctx.teacher.flatten(1).shape[1])
    info["n_outputs"] = n_out
    info["n_calibration"] = int(B.n_samples(ctx.inputs))
    info["n_holdout"] = int(B.n_samples(hold.inputs)) if hold is not None else 0
    if ctx.labels is not None:
        labels = ctx.labels if hold is None else torch.cat([ctx.labels.cpu(), hold.labels.cpu()])
        n_classes = n_out if int(labels.max()) < n_out else int(labels.unique().numel())
        info["chance_accuracy"] = 1.0 / max(n_classes, 1)
        info["accuracy_original"] = (_accuracy(hold.teacher, hold.labels) if hold is not None
                                     else _accuracy(ctx.teacher, ctx.labels))
    info["proxy"] = {"bn_recalibrate": options.bn_recalibrate, "finetune_steps": options.finetune_steps,
                     "ls_correction": getattr(ctx.compressor, "ls_correction", options.ls_correction)}
    if options.sensitivity:
        t0 = time.perf_counter()
        sens = sensitivity_curves(ctx, options)
        rows = {lay["name"]: lay for lay in prof["layers"]}
        for name, (grid, curve) in sens.items():
            row = rows.get(name)
            if row is not None and row.get("signals"):
                row["signals"]["sens_grid"] = grid
                row["signals"]["sensitivity"] = curve
        info["sensitivity_seconds"] = time.perf_counter() - t0
    return prof


def sensitivity_curves(ctx: Any, options: ProxyOptions | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """Per search parameter: ``(sens_grid, L)`` with only that parameter at each grid point.

    Bounded: at most 7 measured points per parameter (:func:`sensitivity_grid`), on at most
    :data:`SENS_SAMPLES` calibration samples; fine-tuning is not applied here.
    """
    options = options or getattr(ctx, "proxy", None) or ProxyOptions()
    options = dataclasses.replace(options, finetune_steps=0)
    comp = ctx.compressor
    prof = comp.profile()
    names = [p["name"] for p in prof["params"]]
    n = min(B.n_samples(ctx.inputs), SENS_SAMPLES)
    x = B.head(ctx.inputs, n)
    t = ctx.teacher[:n]
    output = getattr(ctx, "output", None)
    bs = int(getattr(ctx, "batch_size", 512) or 512)
    grid = sensitivity_grid(comp.theta_min)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name in names:
        curve = []
        for g in grid:
            theta = {q: 1.0 for q in names}
            theta[name] = g
            if g >= 1.0 or not comp.changed_layers(theta):
                curve.append(0.0)
                continue
            model, _ = prepare(comp, theta, x, t, options, bs, ctx.device, output)
            l2, _, _ = fidelity(model, x, t, None, bs, ctx.device, output)
            curve.append(float(l2))
        for i in range(len(curve) - 2, -1, -1):  # non-increasing in theta (noise aside, it is)
            curve[i] = max(curve[i], curve[i + 1])
        out[name] = (grid, curve)
    return out

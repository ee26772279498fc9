"""An export that retrains the trial's compressed architecture (Liu et al. 2019), on the worker.

The export's ``retrain`` options (:class:`bocompress.schemas.RetrainOptions`) pick the mode of
:func:`bocompress.worker.strategies.retrain.retrain`: ``finetune-distill`` (the original as
teacher, no labels), ``finetune-labels``, ``scratch-e`` and ``scratch-b`` (re-initialised, trained on
labels for the original's epochs or for its compute). The compressed model is the trial's
(``compressor.apply(theta)``, as every export builds it). Training data are the job's own
calibration part, or the dataset the options name (all of it); the job's held-out part, which
no trial and no training ever sees, measures L and accuracy before and after.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from bocompress.compressed import to_bytes
from bocompress.worker import batch as B
from bocompress.worker.runtime import TaskError
from bocompress.worker.strategies.training import OptionError, Progress, ShouldStop

__all__ = ["MAX_TRAIN_SAMPLES", "retrain_export"]

#: The most samples of a named dataset a retraining loads.
MAX_TRAIN_SAMPLES = 100_000


def _config(opts: Mapping[str, Any]) -> Any:
    from bocompress.worker.strategies.retrain import RetrainConfig

    mode, epochs = str(opts["mode"]), int(opts["epochs"])
    kw: dict[str, Any] = {"batch_size": int(opts.get("batch_size", 64)), "seed": int(opts.get("seed", 0))}
    if mode.startswith("scratch"):
        kw["original_epochs"] = epochs
        if opts.get("lr") is not None:
            kw["scratch_lr"] = float(opts["lr"])
    else:
        kw["epochs"] = epochs
        if opts.get("lr") is not None:
            kw["lr"] = float(opts["lr"])
    try:
        return RetrainConfig(**kw)
    except OptionError as exc:
        raise TaskError(f"retrain: {exc}") from exc


def _measure(model: Any, ctx: Any) -> dict[str, float]:
    """L (and accuracy) on the held-out part when there is one, else on the calibration part."""
    from bocompress.worker.evaluate import fidelity

    hold = ctx.holdout
    if hold is not None:
        l2, _, acc = fidelity(model, hold.inputs, hold.teacher, hold.labels, 512, ctx.device, ctx.output)
    else:
        l2, _, acc = fidelity(model, ctx.inputs, ctx.teacher, ctx.labels, 512, ctx.device, ctx.output)
    out = {"distill_l2": float(l2)}
    if acc is not None:
        out["accuracy"] = float(acc)
    return out


def retrain_export(client: Any, ctx: Any, job: Mapping[str, Any], source: Mapping[str, Any],
                   opts: Mapping[str, Any], progress: Progress | None = None,
                   should_stop: ShouldStop | None = None) -> tuple[dict[str, float], dict[str, float], bytes]:
    """The retrained compressed model's measured values, their sem (none) and its safetensors bytes.

    Values: ``distill_l2_before``/``distill_l2`` (and ``accuracy_before``/``accuracy`` with labels)
    on the held-out part, ``params``, ``retrain_epochs`` (trained), ``flops_ratio``, ``export_seconds``.

    Raises:
        TaskError: options or data the mode cannot train on (fails the export for good).
        bocompress.worker.strategies.Cancelled: ``should_stop()`` became True (nothing is returned).
    """
    from bocompress.worker.runtime import load_job_data
    from bocompress.worker.strategies.retrain import retrain

    t0 = time.perf_counter()
    cfg = _config(opts)
    mode = str(opts["mode"])
    theta = {k: float(v) for k, v in (source.get("params") or {}).items()}
    student = ctx.compressor.apply(theta).to(ctx.device).eval()
    if opts.get("dataset"):
        x, y = load_job_data(client, str(opts["dataset"]), MAX_TRAIN_SAMPLES, ctx.arch, ctx.model)
        x, y = B.to_device(x, ctx.device), (y.to(ctx.device) if y is not None else None)
    else:
        x, y = ctx.inputs, ctx.labels
    if not hasattr(x, "shape"):
        raise TaskError("retraining takes one input tensor; the dataset has named inputs")
    before = _measure(student, ctx)
    val = (ctx.holdout.inputs, ctx.holdout.labels) if ctx.holdout is not None else None
    try:
        res = retrain(student, ctx.model, mode, (x, y), cfg, val_data=val, progress=progress, should_stop=should_stop)
    except OptionError as exc:
        raise TaskError(f"retrain.{exc.field}: {exc}") from exc
    after = _measure(res.model, ctx)
    model = res.model.cpu()
    params = int(ctx.compressor.count_params(model))
    info = {"theta": theta, "finetune_steps": 0, "lr": 0.0, "params": params, "job_id": int(job["id"]),
            "trial_id": int(source["id"]), "retrain": dict(opts), "retrain_epochs": int(res.epochs),
            **({"output": ctx.output} if ctx.output is not None else {}),
            **({"linearized": list(ctx.linearized)} if ctx.linearized else {})}
    data, _ = to_bytes(ctx.export_base, model, ctx.arch, info)
    values = {"distill_l2_before": before["distill_l2"], "distill_l2": after["distill_l2"], "params": float(params),
              "finetune_steps": 0.0, "retrain_epochs": float(res.epochs), "flops_ratio": float(res.flops_ratio),
              "export_seconds": time.perf_counter() - t0}
    if "accuracy" in before and "accuracy" in after:
        values["accuracy_before"], values["accuracy"] = before["accuracy"], after["accuracy"]
    return values, {}, data

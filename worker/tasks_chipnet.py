"""A ChipNet job's one long task on the worker: prune, measure as a BO trial is measured, serialize.

The job's context (:class:`bocompress.worker.runtime.JobContext`) is the one its profiling built:
the model, the calibration part of the labelled data (with labels), the held-out part and the
``channel_l1`` compressor whose layer table the job's trials are priced in. ChipNet
(:func:`bocompress.worker.strategies.chipnet.chipnet`) trains on the calibration part (the last fifth
of it validates each epoch's hard-pruned model, ChipNet's own model selection) and never sees the
held-out part. Its result is then measured exactly as a BO trial is
(:func:`bocompress.worker.evaluate.evaluate`: L on the calibration inputs, the measured ratio checked
against the layer table's exact one at θ = kept / size per channel group; held-out accuracy and L),
and serialized as an export (:func:`bocompress.compressed.to_bytes`), so the trial's export is this
very model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from bocompress.compressed import to_bytes
from bocompress.worker.runtime import TaskError
from bocompress.worker.strategies.training import OptionError, Progress, ShouldStop

__all__ = ["ChipNetOutcome", "VAL_FRACTION", "run_chipnet_task"]

#: The share of the calibration part that validates (selects) ChipNet's epochs.
VAL_FRACTION = 0.2


@dataclass
class ChipNetOutcome:
    """What the task reports: the trial's values and their sem, the pruned model's bytes, and what
    the service stores with the trial (θ, the kept channels, the budget met)."""

    values: dict[str, float]
    sem: dict[str, float]
    data: bytes
    info: dict[str, Any]

    def parts(self) -> tuple[dict[str, float], dict[str, float], bytes, dict[str, Any]]:
        """``(values, sem, data, info)``, as the worker loop reports a long task."""
        return self.values, self.sem, self.data, self.info


def _config(job: Mapping[str, Any]) -> Any:
    from bocompress.worker.strategies.chipnet import ChipNetConfig

    opts = dict(((job.get("spec") or {}).get("optimizer") or {}).get("chipnet") or {})
    try:
        return ChipNetConfig(**opts)
    except (OptionError, TypeError) as exc:
        raise TaskError(f"optimizer.chipnet: {exc}") from exc


def run_chipnet_task(ctx: Any, job: Mapping[str, Any], task: Mapping[str, Any],
                     progress: Progress | None = None, should_stop: ShouldStop | None = None) -> ChipNetOutcome:
    """Run ChipNet on the job's model and measure its hard-pruned result as a trial.

    Args:
        ctx: the job's context (a ``channel_l1`` compressor, labelled calibration data).
        job: the job JSON of the lease (``spec.optimizer.chipnet`` holds the options).
        task: the task's trial JSON (``params``: ``budget_type``, ``budget``).
        progress: ``progress(fraction, message)``, sent with the heartbeats.
        should_stop: True once the task must stop (its job was cancelled): ChipNet raises
            :class:`bocompress.worker.strategies.Cancelled` before its next step.

    Raises:
        TaskError: data without labels or not one tensor, options ChipNet refuses, a result the
            layer table does not price (both fail the task for good).
    """
    from bocompress.worker.evaluate import evaluate, fidelity
    from bocompress.worker.strategies.chipnet import chipnet

    t0 = time.perf_counter()
    cfg = _config(job)
    params = task.get("params") or {}
    budget_type, budget = str(params.get("budget_type", "params")), float(params.get("budget", 0.0))
    if ctx.labels is None:
        raise TaskError("ChipNet needs labelled training data: the job's dataset has no labels")
    if not isinstance(ctx.inputs, Tensor):
        raise TaskError("ChipNet takes one input tensor; the job's dataset has named inputs")
    x, y = ctx.inputs, ctx.labels
    n_val = max(1, int(len(x) * VAL_FRACTION))
    if len(x) - n_val < 1:
        raise TaskError(f"ChipNet needs more than {len(x)} calibration samples (raise compression.n_calibration)")
    try:
        res = chipnet(ctx.model, (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:]), budget_type, budget, cfg,
                      progress=progress, should_stop=should_stop)
    except OptionError as exc:
        raise TaskError(f"ChipNet refused the job: {exc}") from exc
    groups = {g.name: g for g in ctx.compressor.groups}
    theta: dict[str, float] = {name: 1.0 for name in groups}
    masks: dict[str, list[int]] = {}
    for name, m in res.masks.items():
        g = groups.get(name)
        if g is None or g.size != len(m):
            raise TaskError(f"ChipNet pruned channel group {name!r}, which the job's layer table does not search")
        theta[name] = int(m.sum()) / g.size
        masks[name] = [int(i) for i in m.nonzero().flatten().tolist()]
    measured = evaluate(ctx.compressor, res.model, ctx.inputs, ctx.teacher, ctx.labels, theta,
                        cost_kind=ctx.cost_kind, device=ctx.device, output=ctx.output)
    values = dict(measured["values"])
    sem = dict(measured["sem"])
    if ctx.labels is not None:
        values["accuracy_calib"] = values["accuracy"]
    if ctx.holdout is not None:
        hold = ctx.holdout
        l2h, _, acc = fidelity(res.model, hold.inputs, hold.teacher, hold.labels, 512, ctx.device, ctx.output)
        values["accuracy"] = float(acc)
        values["accuracy_original"] = float((hold.teacher.flatten(1).argmax(1).cpu() == hold.labels.cpu())
                                            .float().mean())
        values["distill_l2_holdout"] = float(l2h)
    values.update({"chipnet_val_accuracy": float(res.val_accuracy), "chipnet_best_epoch": float(res.best_epoch),
                   "chipnet_achieved": float(res.achieved), "chipnet_seconds": float(res.seconds),
                   "eval_seconds": time.perf_counter() - t0})
    student = res.model.cpu()
    data, _ = to_bytes(ctx.model, student, ctx.arch, {
        "theta": theta, "finetune_steps": 0, "lr": 0.0, "params": int(ctx.compressor.count_params(student)),
        "job_id": int(job["id"]), "strategy": "chipnet", "budget_type": budget_type, "budget": budget,
        **({"output": ctx.output} if ctx.output is not None else {}),
        **({"linearized": list(ctx.linearized)} if ctx.linearized else {}),
    })
    res.model.to(ctx.device)
    history = [{k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v) for k, v in h.items()}
               for h in res.history]
    info = {"theta": theta, "masks": masks, "budget_type": budget_type, "budget": budget,
            "achieved": float(res.achieved), "ratios": {k: float(v) for k, v in res.ratios.items()},
            "best_epoch": int(res.best_epoch), "history": history}
    return ChipNetOutcome(values={k: float(v) for k, v in values.items()}, sem=sem, data=data, info=info)

"""What a ChipNet job must be, checked before any work starts (a 422 naming the field).

A job whose ``optimizer.engine`` is ``"chipnet"`` is pruned by one long worker task (the
worker's :mod:`bocompress.worker.strategies.chipnet`) instead of BO proposals. What the request alone
says is checked here; what only an upload's safetensors header says (BatchNorm statistics in
the model's state dict, labels in the dataset) is checked by the store when it looks the uploads
up (:mod:`bocompress.service.db.strategies`).
"""

from __future__ import annotations

from typing import Any

from bocompress.schemas import ZOO_DATA, ChipNetOptions, JobCreate, RetrainOptions
from bocompress.service.api.errors import bad_request

#: Zoo models with BatchNorm layers (a static fact of their architectures; checked against the zoo
#: by tests/service/test_chipnet_jobs.py). ChipNet gates BatchNorm channels, so only these can run it.
ZOO_WITH_BATCHNORM = ("vgg16", "resnet20", "resnet56", "mobilenet")
#: Built-in datasets without labels (ChipNet trains with cross-entropy: it needs labels).
ZOO_UNLABELLED = ("synthetic",)
#: The channel-pruning method whose layer table a ChipNet result is recorded in.
CHIPNET_METHOD = "channel_l1"


def chipnet_spec(body: JobCreate, spec: dict[str, Any]) -> dict[str, Any]:
    """The stored spec of a ChipNet job: checked, with its defaults filled and one trial.

    Raises:
        APIError: 422 naming the field that makes the job one ChipNet cannot run.
    """
    if not body.is_compression:
        raise bad_request("optimizer.engine", "'chipnet' prunes a model: it needs a compression job")
    c = body.compression
    assert c is not None
    if c.method != CHIPNET_METHOD:
        raise bad_request("compression.method", f"ChipNet prunes channels: use {CHIPNET_METHOD!r}, got {c.method!r}")
    o = body.objective
    if o.kind != "constrained":
        raise bad_request("objective.kind", f"ChipNet prunes to a budget: use 'constrained', got {o.kind!r}")
    if o.budget is None or not 0.0 < float(o.budget) < 1.0:
        raise bad_request("objective.budget", f"ChipNet's budget is a ratio strictly between 0 and 1, got {o.budget!r}")
    if c.model in ZOO_MODELS_WITHOUT_BN:
        raise bad_request("compression.model", f"{c.model!r} has no BatchNorm: ChipNet gates BatchNorm channels "
                          f"(zoo models with BatchNorm: {', '.join(ZOO_WITH_BATCHNORM)})")
    if c.data in ZOO_UNLABELLED:
        raise bad_request("compression.data", f"{c.data!r} has no labels: ChipNet trains on labelled data")
    if c.holdout_fraction <= 0.0:
        raise bad_request("compression.holdout_fraction", "ChipNet's trial reports held-out accuracy: "
                          "hold out a share of the data (> 0)")
    out = dict(spec)
    opt = dict(out.get("optimizer") or {})
    opt["chipnet"] = (body.optimizer.chipnet or ChipNetOptions()).model_dump(mode="json")
    out["optimizer"] = opt
    # one long task, one trial: the scheduler never proposes for a job whose budget is spent
    out["budget"] = {**(out.get("budget") or {}), "max_trials": 1, "max_parallel": 1}
    return out


#: Retraining modes that train on labels.
LABEL_MODES = ("finetune-labels", "scratch-e", "scratch-b")


def checked_retrain(opts: RetrainOptions | None) -> dict[str, Any] | None:
    """An export's ``retrain`` options as the task stores them, or None; what the request alone
    says is checked here (the job's own data and uploads are checked by the store).

    Raises:
        APIError: 422 naming ``retrain.dataset`` for an unknown set or one without labels for a
            mode that trains on labels.
    """
    if opts is None:
        return None
    ds = opts.dataset
    if ds is not None and not ds.startswith("ds_") and ds not in ZOO_DATA:
        raise bad_request("retrain.dataset", f"{ds!r} is neither an uploaded dataset id (ds_...) nor a built-in "
                          f"set ({', '.join(ZOO_DATA)})")
    if ds in ZOO_UNLABELLED and opts.mode in LABEL_MODES:
        raise bad_request("retrain.dataset", f"{ds!r} has no labels: {opts.mode} trains on labels "
                          "(finetune-distill needs none)")
    return opts.model_dump(mode="json", exclude_none=True)


def _zoo_without_bn() -> tuple[str, ...]:
    from bocompress.schemas import ZOO_MODELS

    return tuple(m for m in ZOO_MODELS if m not in ZOO_WITH_BATCHNORM)


#: Zoo models ChipNet refuses.
ZOO_MODELS_WITHOUT_BN = _zoo_without_bn()

__all__ = ["CHIPNET_METHOD", "LABEL_MODES", "checked_retrain", "ZOO_MODELS_WITHOUT_BN", "ZOO_UNLABELLED", "ZOO_WITH_BATCHNORM", "chipnet_spec"]

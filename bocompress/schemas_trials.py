"""The wire schemas of trials and what moves them: pages, ask/tell, leases, results, and the
uploads, tokens, exports and errors of the API.

Part of the contract (:mod:`bocompress.schemas` exports all of it): only pydantic is imported.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from bocompress.schemas_profile import LayerInfo, ProfileReport
from bocompress.schemas_types import ZOO_DATA, Bool, Int, JobState, Num, Role, TaskKind, TrialState, _number, _Strict
from pydantic import BaseModel, Field, field_validator, model_validator

# What a metric mapping may hold (checked by _check_metrics; stated in the OpenAPI document).
_METRICS_SCHEMA: dict[str, Any] = {"maxProperties": 1000, "propertyNames": {"minLength": 1, "maxLength": 200}}
_SEM_SCHEMA: dict[str, Any] = {**_METRICS_SCHEMA, "additionalProperties": {"type": "number", "minimum": 0}}



class TrialOut(BaseModel):
    id: int
    job_id: int
    seq: int
    number: int = Field(description="0-based order of creation within the job")
    state: TrialState
    params: dict[str, float]
    values: dict[str, float] = Field(default_factory=dict)
    sem: dict[str, float] = Field(default_factory=dict)
    attempt: int
    worker: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    proposal: Literal["engine", "cheap"] | None = Field(
        default=None, description="what made the point: the BO engine, or a cheap proposal answered at once "
                                  "when the buffer was empty (a perturbation of the incumbent or a quasi-random "
                                  "point); null for trials older than the field")


class JobOut(BaseModel):
    id: int
    name: str
    state: JobState
    owner: str
    kind: Literal["compression", "generic"]
    counts: dict[str, int]
    best: TrialOut | None = None
    created_at: datetime
    updated_at: datetime
    reason: str | None = None
    seq: int = 0
    spec: dict[str, Any]
    layers: list[LayerInfo] | None = None
    search_space: list[dict[str, Any]] | None = None
    totals: dict[str, float] | None = None
    warnings: list[str] = Field(default_factory=list, description="what a user must know about the best trial")
    collapsed: bool = Field(default=False, description="the best trial lost the model's function (L >= 0.9 or "
                            "held-out accuracy near chance)")
    progress: dict[str, Any] | None = Field(
        default=None, description="a ChipNet job's one long task: its state, fraction done and message")
    pipeline: dict[str, Any] | None = Field(
        default=None, description="the pipeline (a job spec's recipe) this job belongs to: kind, stage "
        "(first | finetune | second | done | failed | cancelled), jobs, export, total_ratio, reason")


class Page(BaseModel):
    items: list[Any]
    next_cursor: str | None = None


class AskRequest(_Strict):
    count: Int = Field(default=1, ge=1, le=1000)


class AskResponse(BaseModel):
    trials: list[TrialOut]


def _check_metrics(v: dict[str, float], field: str) -> dict[str, float]:
    if len(v) > 1000:
        raise ValueError(f"{field}: at most 1000 entries")
    for k, x in v.items():
        if not isinstance(k, str) or not (0 < len(k) <= 200):
            raise ValueError(f"{field}: metric names are 1..200 characters")
        if x is None or not math.isfinite(x):
            raise ValueError(f"{field}[{k!r}] must be a finite number, got {x!r}")
    return v


class _Result(_Strict):
    """Metric values and their standard errors: finite numbers, errors >= 0."""

    values: dict[str, Num] = Field(default_factory=dict, json_schema_extra=_METRICS_SCHEMA)
    sem: dict[str, Num] = Field(default_factory=dict, json_schema_extra=_SEM_SCHEMA)

    @field_validator("values")
    @classmethod
    def _values_finite(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_metrics(v, "values")

    @field_validator("sem")
    @classmethod
    def _sem_finite(cls, v: dict[str, float]) -> dict[str, float]:
        v = _check_metrics(v, "sem")
        for k, x in v.items():
            if x < 0:
                raise ValueError(f"sem[{k!r}] must be >= 0")
        return v


class TellRequest(_Result):
    values: dict[str, Num] = Field(default_factory=dict, json_schema_extra=_METRICS_SCHEMA)
    sem: dict[str, Num] = Field(default_factory=dict, json_schema_extra=_SEM_SCHEMA)
    failed: Bool = False
    error: str | None = Field(default=None, max_length=20_000)


    @model_validator(mode="after")
    def _has_result(self) -> "TellRequest":
        if not self.failed and not self.values:
            raise ValueError("values: give at least one metric, or failed=true")
        return self


class CompleteRequest(_Result):
    """A worker's result. ``profile`` for profiling tasks, ``artifact`` metadata for exports."""

    values: dict[str, Num] = Field(default_factory=dict, json_schema_extra=_METRICS_SCHEMA)
    sem: dict[str, Num] = Field(default_factory=dict, json_schema_extra=_SEM_SCHEMA)
    profile: ProfileReport | None = None
    artifact: dict[str, Any] | None = None
    lease_token: str | None = Field(default=None, max_length=64, description="lease.token from the lease")



class FailRequest(_Strict):
    error: str = Field(min_length=1, max_length=20_000)
    retry: Bool = False
    lease_token: str | None = Field(default=None, max_length=64)


class HeartbeatRequest(_Strict):
    lease_token: str | None = Field(default=None, max_length=64)
    progress: float | None = Field(default=None, ge=0.0, le=1.0,
                                   description="a long task's (ChipNet's) fraction done, shown with the job")
    message: str | None = Field(default=None, max_length=500, description="what the long task is doing now")

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_number(cls, v: Any) -> Any:
        return v if v is None else _number(v)


class LeaseRequest(_Strict):
    worker: str = Field(default="worker", min_length=1, max_length=200)
    kinds: list[TaskKind] = Field(default_factory=lambda: ["profile", "evaluate", "export"])


class LeaseInfo(BaseModel):
    token: str | None = Field(default=None, description="identifies this lease; send it back with heartbeat/complete/fail")
    expires_at: datetime | None
    lease_seconds: float
    attempt: int


class LeaseResponse(BaseModel):
    task: TaskKind
    trial: TrialOut
    job: JobOut
    lease: LeaseInfo
    source: TrialOut | None = Field(default=None, description="export tasks: the trial whose model to build")


class HeartbeatResponse(BaseModel):
    lease: LeaseInfo


# --------------------------------------------------------------------------- uploads, tokens


class UploadOut(BaseModel):
    id: str
    kind: Literal["model", "dataset"]
    arch: str | None = None
    arch_spec: dict[str, Any] | None = Field(default=None, description="the model spec, when 'arch' was one")
    size: int
    sha256: str
    created_at: datetime
    tensors: dict[str, list[int]] = Field(
        default_factory=dict, description="name -> shape of at most 100 tensors (the first by name): a summary")
    n_tensors: int = Field(default=0, description="how many tensors the file holds")
    tensors_truncated: bool = Field(default=False, description="whether 'tensors' lists only some of them")


class TokenCreate(_Strict):
    role: Role
    owner: str | None = Field(default=None, min_length=1, max_length=200)
    name: str | None = Field(default=None, max_length=200)


class TokenOut(BaseModel):
    id: int
    role: Role
    owner: str
    name: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None
    token: str | None = Field(default=None, description="the secret; shown once, at creation")


#: The retraining modes of an export (Liu et al. 2019; the worker's bocompress.worker.strategies.retrain).
RETRAIN_MODES = ("finetune-distill", "finetune-labels", "scratch-e", "scratch-b")


class TrainingRun(_Strict):
    """What every retraining on a worker takes beside its mode and epochs (``retrain`` of an export,
    ``recipe.finetune``)."""

    lr: float | None = Field(default=None, gt=0.0, le=10.0,
                             description="learning rate (SGD; the scratch modes' peak); default: the mode's")
    batch_size: Int = Field(default=64, ge=1, le=100_000)
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number(cls, v: Any) -> Any:
        return v if v is None else _number(v)


class RetrainOptions(TrainingRun):
    """``retrain`` of an export: fine-tune or train from scratch the trial's compressed architecture.

    ``finetune-distill`` needs no labels; the other three train on labels. ``epochs`` are the
    fine-tunes' epochs and, for the scratch modes, the original's training epochs ``E``
    (Scratch-E trains ``E`` epochs, Scratch-B ``ceil(E * F_full / F_pruned)``: the same compute).
    """

    mode: Literal["finetune-distill", "finetune-labels", "scratch-e", "scratch-b"]
    epochs: Int = Field(ge=1, le=10_000)
    dataset: str | None = Field(default=None, min_length=1, max_length=200,
                                description="training data: an uploaded dataset id or a built-in set "
                                "(default: the job's own data, its calibration part)",
                                json_schema_extra={"pattern": "^(?:ds_[0-9a-f]{24}|" + "|".join(ZOO_DATA) + ")$"})


class ExportRequest(_Strict):
    """``POST /api/v1/jobs/{id}/trials/{trial_id}/export``: build the compressed model of a trial."""

    finetune_steps: Int = Field(default=0, ge=0, le=100_000, description="distillation fine-tuning steps")
    lr: Num = Field(default=1e-4, gt=0.0, le=1.0)
    retrain: RetrainOptions | None = Field(default=None, description="retrain the compressed architecture "
                                           "(instead of finetune_steps): docs/strategies.md")

    @model_validator(mode="after")
    def _one_training(self) -> "ExportRequest":
        if self.retrain is not None and self.finetune_steps:
            raise ValueError("retrain: give either finetune_steps or retrain, not both")
        return self


class ExportOut(BaseModel):
    id: int = Field(description="the export task's id")
    job_id: int
    trial_id: int
    state: TrialState
    finetune_steps: int
    lr: float
    values: dict[str, float] = Field(default_factory=dict)
    artifact: dict[str, Any] | None = None
    error: str | None = None
    retrain: dict[str, Any] | None = Field(default=None, description="the retraining asked for, if any")
    progress: dict[str, Any] | None = Field(default=None, description="a retraining's fraction done and message")


class ErrorOut(BaseModel):
    detail: str
    code: str

"""The wire contract of bocompress (v1), shared by the service, the workers and users.

Field and endpoint names here are fixed by DESIGN.md: extend them, never rename them.
Only pydantic is imported, so ``import bocompress`` stays light.

This module defines the job spec (``JobCreate`` and its parts) and exports every wire schema:
the shared field types and literals live in :mod:`bocompress.schemas_types`, the layer table
(``ProfileReport``) in :mod:`bocompress.schemas_profile`, trials, leases, uploads, tokens, exports
and errors in :mod:`bocompress.schemas_trials`; import them from here.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from bocompress.schemas_profile import (
    CostFactor,
    CostForm,
    CostTerm,
    LayerInfo,
    LayerSignals,
    ProfileReport,
    SearchParam,
)
from bocompress.schemas_trials import (
    AskRequest,
    AskResponse,
    CompleteRequest,
    ErrorOut,
    ExportOut,
    ExportRequest,
    FailRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    JobOut,
    LeaseInfo,
    LeaseRequest,
    LeaseResponse,
    Page,
    RetrainOptions,
    TrainingRun,
    TellRequest,
    TokenCreate,
    TokenOut,
    TrialOut,
    UploadOut,
)
from bocompress.schemas_types import (
    API_PREFIX,
    COST_KINDS,
    IMPORT_PATH_RE,
    JOB_STATES,
    MAX_EXACT_INT,
    METHODS,
    OBJECTIVE_KINDS,
    TERMINAL_TRIAL_STATES,
    TRIAL_STATES,
    ZOO_DATA,
    ZOO_MODELS,
    Bool,
    CostKind,
    Int,
    JobState,
    MethodName,
    Num,
    Role,
    TaskKind,
    TrialState,
    _finite,
    _number,
    _Strict,
)
from pydantic import Field, StringConstraints, field_validator, model_validator

__all__ = [
    # shared field types and literals (bocompress.schemas_types)
    "API_PREFIX", "TRIAL_STATES", "TrialState", "TERMINAL_TRIAL_STATES", "JOB_STATES", "JobState", "TaskKind",
    "Role", "ZOO_MODELS", "ZOO_DATA", "IMPORT_PATH_RE", "METHODS", "MethodName", "COST_KINDS", "CostKind",
    "OBJECTIVE_KINDS", "MAX_EXACT_INT", "Num", "Int", "Bool",
    # the job spec (here)
    "ParameterSpec", "Glob", "ListGlob", "LayerSelection", "split_layer_patterns", "CompressionSpec", "Objective",
    "Budget", "ChipNetOptions", "OptimizerSpec", "JobCreate", "Recipe", "RecipeFirst", "RecipeSecond", "RecipeFinetune",
    # the layer table (bocompress.schemas_profile)
    "CostFactor", "CostTerm", "CostForm", "LayerSignals", "LayerInfo", "SearchParam", "ProfileReport",
    # trials, leases, uploads, tokens, exports, errors (bocompress.schemas_trials)
    "TrialOut", "JobOut", "Page", "AskRequest", "AskResponse", "TellRequest", "CompleteRequest", "FailRequest",
    "HeartbeatRequest", "LeaseRequest", "LeaseInfo", "LeaseResponse", "HeartbeatResponse", "UploadOut",
    "TokenCreate", "TokenOut", "RetrainOptions", "ExportRequest", "ExportOut", "ErrorOut",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]/]+$")
# The same rule for the OpenAPI document (ECMA regex, no look-ahead): those characters, not
# starting with "/", never two dots in a row.
_NAME_PATTERN = r"^(?:\.(?:[A-Za-z0-9_:\-\[\]/]\.?)*|[A-Za-z0-9_:\-\[\]]\.?(?:[A-Za-z0-9_:\-\[\]/]\.?)*)$"


# --------------------------------------------------------------------------- job spec


class ParameterSpec(_Strict):
    """One dimension of a generic job's search space."""

    name: str = Field(min_length=1, max_length=200, json_schema_extra={"pattern": _NAME_PATTERN})
    type: Literal["float", "int"] = "float"
    low: Num
    high: Num
    log: Bool = False

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v.startswith("/") or ".." in v:
            raise ValueError("parameter name may hold only letters, digits and _ . : - [ ] /")
        return v

    @field_validator("low", "high")
    @classmethod
    def _bounds_finite(cls, v: float) -> float:
        return _finite(v, "bound")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "ParameterSpec":
        if not self.low < self.high:
            raise ValueError(f"parameter {self.name!r}: low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"parameter {self.name!r}: a log-scaled parameter needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"parameter {self.name!r}: an int parameter needs integer bounds")
        if self.type == "int" and max(abs(self.low), abs(self.high)) > MAX_EXACT_INT:
            raise ValueError(f"parameter {self.name!r}: an int parameter's bounds must be within "
                             f"+-2**53 (the integers a float holds exactly), got [{self.low:g}, {self.high:g}]")
        if not math.isfinite(self.high - self.low):
            raise ValueError(f"parameter {self.name!r}: the width high - low overflows a float "
                             f"([{self.low:g}, {self.high:g}]); rescale the parameter")
        if self.log and not math.isfinite(math.log(self.high) - math.log(self.low)):
            raise ValueError(f"parameter {self.name!r}: the log scale of [{self.low:g}, {self.high:g}] overflows")
        if not self.log and self.type == "float" and self.low + (self.high - self.low) * 0.5 in (self.low, self.high):
            raise ValueError(f"parameter {self.name!r}: [{self.low:g}, {self.high:g}] is too narrow for its "
                             "magnitude to hold distinct values; rescale the parameter")
        return self


def _check_globs(patterns: list[str], where: str, allow_negation: bool = False) -> None:
    for i, p in enumerate(patterns):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}[{i}]: a pattern must be a non-empty string")
        if len(p) > 500:
            raise ValueError(f"{where}[{i}]: a pattern is at most 500 characters")
        if p.startswith("!") and (not allow_negation or not p[1:].strip()):
            raise ValueError(f"{where}[{i}]: {p!r}: '!' excludes, and only in the list form, followed by a glob")


_OUTPUT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: One layer glob: non-empty, not starting with whitespace or '!', at most 500 characters.
Glob = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^!\s][\s\S]*$")]
#: A glob of the list form, where a leading '!' excludes.
ListGlob = Annotated[str, StringConstraints(max_length=501, pattern=r"^!?[^!\s][\s\S]*$")]


class LayerSelection(_Strict):
    """``compression.layers`` as ``{"include": [...], "exclude": [...]}`` (fnmatch globs over module names)."""

    include: list[Glob] = Field(default_factory=lambda: ["*"], min_length=1, max_length=1000)
    exclude: list[Glob] = Field(default_factory=list, max_length=1000)

    @field_validator("include")
    @classmethod
    def _include_ok(cls, v: list[str]) -> list[str]:
        _check_globs(v, "layers.include")
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude_ok(cls, v: list[str]) -> list[str]:
        _check_globs(v, "layers.exclude")
        return v


def split_layer_patterns(layers: Any) -> tuple[list[str], list[str]]:
    """``compression.layers`` (a glob, a list with ``!glob`` exclusions, or include/exclude) as two lists.

    A list with only ``!`` entries includes every layer (``["!conv1"]``: all but conv1).

    Raises:
        ValueError: anything else than those forms.
    """
    if layers is None:
        return ["*"], []
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, LayerSelection):
        return list(layers.include), list(layers.exclude)
    if isinstance(layers, dict):
        extra = set(layers) - {"include", "exclude"}
        if extra:
            raise ValueError(f"layers: unknown keys {sorted(extra)}; use 'include' and 'exclude'")
        inc = layers.get("include", ["*"])
        exc = layers.get("exclude", [])
        inc = [inc] if isinstance(inc, str) else list(inc)
        exc = [exc] if isinstance(exc, str) else list(exc)
        _check_globs(inc, "layers.include")
        _check_globs(exc, "layers.exclude")
        if not inc:
            raise ValueError("layers.include must not be empty")
        return inc, exc
    if isinstance(layers, (list, tuple)):
        items = list(layers)
        _check_globs(items, "layers", allow_negation=True)
        inc = [p for p in items if not p.startswith("!")]
        exc = [p[1:] for p in items if p.startswith("!")]
        return (inc or ["*"]), exc
    raise ValueError(f"layers must be a list of globs or {{'include': [...], 'exclude': [...]}}, got {type(layers).__name__}")


class CompressionSpec(_Strict):
    """What to compress, with what, and over which layers."""

    model: str = Field(min_length=1, max_length=200, description="model id (from upload), zoo name or import path",
                       json_schema_extra={"pattern": "^(?:mdl_[0-9a-f]{24}|" + "|".join(ZOO_MODELS) + "|"
                                                     + IMPORT_PATH_RE.pattern[1:-1] + ")$"})
    data: str = Field(min_length=1, max_length=200, description="dataset id (from upload) or zoo name",
                      json_schema_extra={"pattern": "^(?:ds_[0-9a-f]{24}|" + "|".join(ZOO_DATA) + ")$"})
    method: MethodName | dict[str, MethodName] = Field(
        description="one method, or a mapping layer type -> method, e.g. {'Conv2d': 'tucker2', 'Linear': 'svd'}",
        json_schema_extra={"minProperties": 1, "propertyNames": {"enum": ["Conv2d", "Linear"]}},
    )
    layers: Annotated[list[ListGlob], Field(min_length=1, max_length=1000)] | LayerSelection = Field(
        default_factory=lambda: ["*"],
        description="fnmatch globs over module names ('!glob' excludes), or {'include': [...], 'exclude': [...]}; "
        "excluded layers are not searched and stay dense",
    )
    theta_min: Num = Field(default=0.05, gt=0.0, lt=1.0)
    n_calibration: Int = Field(default=256, ge=8, le=100_000)
    output: str | int | None = Field(
        default=None, description="the part of the model's output to distill: a key of a dict/ModelOutput "
        "(default 'logits') or an index of a tuple (default 0)",
        json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _OUTPUT_KEY.pattern},
            {"type": "integer", "minimum": -64, "maximum": 63},
            {"type": "null"},
        ]},
    )

    @field_validator("output", mode="before")
    @classmethod
    def _output_ok(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError("output: a key (string) or a tuple index (integer)")
        if isinstance(v, str) and not (len(v) <= 200 and _OUTPUT_KEY.match(v)):
            raise ValueError("output: a key must be an identifier such as 'logits'")
        if isinstance(v, float):
            if not v.is_integer():
                raise ValueError("output: a tuple index must be an integer")
            v = int(v)
        if isinstance(v, int) and not -64 <= v <= 63:
            raise ValueError("output: a tuple index must be in -64..63")
        return v

    bn_recalibrate: Bool = Field(
        default=True, description="re-estimate BatchNorm statistics on the calibration inputs before measuring"
    )
    holdout_fraction: Num = Field(
        default=0.3, ge=0.0, lt=1.0,
        description="with labelled data: the seeded share held out for 'accuracy' only (never used for L)",
    )
    finetune_steps: Int = Field(default=0, ge=0, le=10_000, description="distillation steps before measuring (0: none)")
    finetune_lr: Num = Field(default=1e-4, gt=0.0, le=1.0, description="Adam learning rate of those steps")
    sensitivity: Bool = Field(
        default=True, description="measure each layer's L curve at profiling (at most 8 points per layer)"
    )
    ls_correction: Bool | None = Field(
        default=None, description="least-squares reconstruction after compressing (None: the method's default)"
    )

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: Any) -> Any:
        patterns = v if isinstance(v, list) else [*v.include, *v.exclude]
        if isinstance(v, list):
            if not 1 <= len(v) <= 1000:
                raise ValueError("layers: give 1 to 1000 patterns")
            _check_globs(v, "layers", allow_negation=True)
        if not patterns:
            raise ValueError("layers: give at least one pattern")
        return v

    @field_validator("method")
    @classmethod
    def _method_map(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if not v:
                raise ValueError("method mapping must not be empty")
            for k in v:
                if k not in ("Conv2d", "Linear"):
                    raise ValueError(f"method mapping key {k!r}: use 'Conv2d' or 'Linear'")
        return v


class Objective(_Strict):
    """A compression objective (``kind``) or a generic one (``metric`` + ``direction``)."""

    kind: Literal["scalarized", "constrained", "pareto"] | None = None
    kappa: Num = Field(default=1.0, gt=0.0, le=1e6)
    cost: CostKind = "params"
    budget: float | None = Field(gt=0.0, le=1.0, default=None, description="max R for 'constrained'")
    metric: str | None = Field(default=None, min_length=1, max_length=200)
    direction: Literal["minimize", "maximize"] = "minimize"

    @field_validator("kappa")
    @classmethod
    def _kappa_finite(cls, v: float) -> float:
        return _finite(v, "kappa")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_number(cls, v: Any) -> Any:
        return v if v is None else _number(v)

    @model_validator(mode="after")
    def _constrained_has_budget(self) -> "Objective":
        if self.kind == "constrained" and self.budget is None:
            raise ValueError("a 'constrained' objective needs a 'budget' (the largest allowed ratio R)")
        return self


class Budget(_Strict):
    max_trials: Int = Field(default=60, ge=1, le=100_000)
    max_parallel: Int = Field(default=4, ge=1, le=1024)
    max_attempts: Int = Field(default=3, ge=1, le=100)
    lease_seconds: Num = Field(default=60.0, ge=1.0, le=86_400.0)


class ChipNetOptions(_Strict):
    """``optimizer.chipnet``: the options of a ChipNet job (the paper's defaults; docs/strategies.md).

    The names are those of the worker's ``ChipNetConfig``.
    """

    epochs: Int = Field(default=20, ge=1, le=10_000, description="soft-pruning epochs (paper: 20)")
    lr: Num = Field(default=1e-3, gt=0.0, le=1.0, description="AdamW learning rate of the weights")
    gate_lr: float | None = Field(default=None, gt=0.0, le=10.0, description="the gates' learning rate (None: lr)")
    weight_decay: Num = Field(default=1e-3, ge=0.0, le=1.0)
    batch_size: Int = Field(default=32, ge=1, le=100_000)
    w_budget: Num = Field(default=30.0, ge=0.0, le=1e6, description="weight of the budget loss (paper: 30)")
    w_crisp: Num = Field(default=10.0, ge=0.0, le=1e6, description="weight of the crispness loss (paper: 10)")
    bn_batches: Int = Field(default=8, ge=0, le=10_000)
    finetune_epochs: Int = Field(default=0, ge=0, le=10_000, description="label fine-tuning of the pruned model")
    finetune_lr: Num = Field(default=1e-3, gt=0.0, le=1.0)
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)

    @field_validator("gate_lr", mode="before")
    @classmethod
    def _gate_lr_number(cls, v: Any) -> Any:
        return v if v is None else _number(v)


class OptimizerSpec(_Strict):
    n_initial: Int = Field(default=8, ge=1, le=10_000)
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)
    engine: Literal["auto", "sobol", "gp", "uniform", "energy", "global", "knapsack", "chipnet"] = Field(
        default="auto",
        description="'auto': the one-shot allocators' points and Sobol for n_initial trials, then the GP; "
        "'sobol': Sobol only; 'uniform' | 'energy' | 'global' | 'knapsack' (compression jobs): one "
        "one-shot allocation per target R (the budget of 'constrained', else R = 0.25, 0.5, 0.75), then done; "
        "'chipnet' (compression jobs, channel_l1, constrained): one ChipNet run on a worker, whose "
        "hard-pruned result is the job's one trial",
    )
    chipnet: ChipNetOptions | None = Field(default=None, description="ChipNet's options (engine 'chipnet')")


#: Methods that compress Linear layers (the second pass's layer type): tucker2 and channel_lasso compress none.
#: The layer types each method compresses (``svd`` on a Conv2d: only 1x1 convolutions).
METHOD_TYPES = {"svd": ("Linear", "Conv2d"), "tucker2": ("Conv2d",), "magnitude": ("Conv2d", "Linear"),
                "channel_l1": ("Conv2d", "Linear"), "channel_lasso": ("Conv2d",)}
#: The methods that compress Linear layers (a recipe's second pass).
LINEAR_METHODS = tuple(m for m in METHODS if "Linear" in METHOD_TYPES[m])
LinearMethodName = Literal[LINEAR_METHODS]  # type: ignore[valid-type]


class RecipePass(_Strict):
    """One BO pass of a two-pass recipe: which method on which layers (defaults: the job's)."""

    layers: Annotated[list[ListGlob], Field(min_length=1, max_length=1000)] | None = Field(
        default=None, description="fnmatch globs over module names for this pass (default: the job's layers)")

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: Any) -> Any:
        if v is not None:
            _check_globs(v, "layers", allow_negation=True)
        return v


def _pass_method(v: Any, layer_type: str, allowed: tuple[str, ...]) -> Any:
    """A pass's ``method`` said plainly when it is not one the pass can run (before pydantic's
    union messages): a mapping of another layer type, or a method compressing none of this one."""
    if isinstance(v, dict):
        if not v:
            raise ValueError("method mapping must not be empty: this pass would select no layer type")
        other = sorted(set(map(str, v)) - {layer_type})
        if other:
            raise ValueError(f"this pass compresses {layer_type} layers only; {other} belong to the other pass")
        m = v.get(layer_type)
    else:
        m = v
    if isinstance(m, str) and m in METHODS and m not in allowed:
        raise ValueError(f"{m!r} compresses no {layer_type} layer: this pass would select no layer type "
                         f"(use one of {', '.join(allowed)})")
    return v


class RecipeFirst(RecipePass):
    """The first pass: Conv2d layers."""

    method: MethodName | dict[Literal["Conv2d"], MethodName] | None = Field(
        default=None, description="the method of the Conv2d layers (or {'Conv2d': method}); default: the job's "
        "method for Conv2d (a mapping's entry, or one method that compresses it), else tucker2",
        json_schema_extra={"minProperties": 1})

    @field_validator("method", mode="before")
    @classmethod
    def _method_ok(cls, v: Any) -> Any:
        return _pass_method(v, "Conv2d", METHODS)


class RecipeSecond(RecipePass):
    """The second pass: Linear layers of the fine-tuned first pass."""

    method: LinearMethodName | dict[Literal["Linear"], LinearMethodName] | None = Field(
        default=None, description="the method of the Linear layers (or {'Linear': method}; tucker2 and "
        "channel_lasso compress no Linear layer); default: the job's method for Linear, else svd",
        json_schema_extra={"minProperties": 1})

    @field_validator("method", mode="before")
    @classmethod
    def _method_ok(cls, v: Any) -> Any:
        return _pass_method(v, "Linear", LINEAR_METHODS)


class RecipeFinetune(TrainingRun):
    """The fine-tune between the passes: a ``finetune-distill`` retraining of the first pass's best."""

    epochs: Int = Field(default=5, ge=1, le=10_000)


class Recipe(_Strict):
    """``recipe`` of a compression job: Ma et al.'s two passes as one pipeline (docs/strategies.md).

    The job is the first pass (BO over its ``first`` layers); when it completes, its best trial is
    exported with a ``finetune-distill`` retraining, and a second job searches the ``second``
    layers of that fine-tuned model, with the same objective and budget.
    """

    kind: Literal["two-pass"] = Field(description="'two-pass': convs first, fine-tune, then the linear layers")
    first: RecipeFirst = Field(default_factory=RecipeFirst)
    finetune: RecipeFinetune = Field(default_factory=RecipeFinetune)
    second: RecipeSecond = Field(default_factory=RecipeSecond)


class JobCreate(_Strict):
    """``POST /api/v1/jobs``: a compression job or a generic (ask/tell) job."""

    name: str = Field(min_length=1, max_length=200)
    compression: CompressionSpec | None = None
    parameters: list[ParameterSpec] | None = Field(default=None, json_schema_extra={"minItems": 1, "maxItems": 1000})
    objective: Objective = Field(default_factory=Objective)
    budget: Budget = Field(default_factory=Budget)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    recipe: Recipe | None = Field(default=None, description="a multi-stage pipeline this job starts "
                                  "(compression jobs): docs/strategies.md")

    @model_validator(mode="after")
    def _one_form(self) -> "JobCreate":
        if (self.compression is None) == (self.parameters is None):
            raise ValueError("give exactly one of 'compression' (a compression job) or 'parameters' (a generic job)")
        if self.parameters is not None:
            if len(self.parameters) == 0:
                raise ValueError("parameters: the list must not be empty")
            if len(self.parameters) > 1000:
                raise ValueError("parameters: at most 1000")
            names = [p.name for p in self.parameters]
            if len(set(names)) != len(names):
                raise ValueError("parameters: names must be unique")
            if self.objective.kind is not None:
                raise ValueError("objective.kind is for compression jobs; a generic job takes 'metric' and 'direction'")
            if self.objective.metric is None:
                self.objective.metric = "objective"
        else:
            if self.objective.metric is not None:
                raise ValueError("objective.metric is for generic jobs; a compression job takes 'kind'")
            if self.objective.kind is None:
                self.objective.kind = "scalarized"
        return self

    @property
    def is_compression(self) -> bool:
        return self.compression is not None

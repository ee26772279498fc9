"""The wire contract of bocompress (v1), shared by the service, the workers and users.

Field and endpoint names here are fixed by DESIGN.md: extend them, never rename them.
Only pydantic is imported, so ``import bocompress`` stays light.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from bocompress import states as _states
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)

API_PREFIX = "/api/v1"

# The states' strings, from the one enum of each (bocompress.states).
TRIAL_STATES = tuple(s.value for s in _states.TrialState)
TrialState = Literal[TRIAL_STATES]  # type: ignore[valid-type]
TERMINAL_TRIAL_STATES = tuple(s.value for s in _states.TERMINAL_TRIAL_STATES)
JOB_STATES = tuple(s.value for s in _states.JobState)
JobState = Literal[JOB_STATES]  # type: ignore[valid-type]
TaskKind = Literal["profile", "evaluate", "export"]
Role = Literal["admin", "client", "worker"]

ZOO_MODELS = ("digits-mlp", "digits-cnn", "vgg16", "resnet20", "resnet56", "mobilenet", "transformer")
ZOO_DATA = ("digits", "digits-train", "digits32", "digits32-train", "digits-tokens", "digits-tokens-train", "synthetic")
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
METHODS = ("svd", "tucker2", "magnitude", "channel_l1", "channel_lasso")
MethodName = Literal["svd", "tucker2", "magnitude", "channel_l1", "channel_lasso"]
COST_KINDS = ("params", "flops", "channels", "activation")
CostKind = Literal["params", "flops", "channels", "activation"]
OBJECTIVE_KINDS = ("scalarized", "constrained", "pareto")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]/]+$")
# The same rule for the OpenAPI document (ECMA regex, no look-ahead): those characters, not
# starting with "/", never two dots in a row.
_NAME_PATTERN = r"^(?:\.(?:[A-Za-z0-9_:\-\[\]/]\.?)*|[A-Za-z0-9_:\-\[\]]\.?(?:[A-Za-z0-9_:\-\[\]/]\.?)*)$"
# What a metric mapping may hold (checked by _check_metrics; stated in the OpenAPI document).
_METRICS_SCHEMA: dict[str, Any] = {"maxProperties": 1000, "propertyNames": {"minLength": 1, "maxLength": 200}}
_SEM_SCHEMA: dict[str, Any] = {**_METRICS_SCHEMA, "additionalProperties": {"type": "number", "minimum": 0}}


#: The largest integer a float holds exactly (and so a JSON reader, a float column, the GP): the
#: bound of an ``int`` parameter, so what comes back is the integer that was sent.
MAX_EXACT_INT = 2**53


_YAML_EXP = re.compile(r"^[+-]?[0-9]+[eE][+-]?[0-9]+$")


def _number(v: Any) -> Any:
    """Numbers only: JSON strings and booleans are refused, never read as numbers ("0.1", true)."""
    if isinstance(v, (str, bytes, bool)):
        # PyYAML reads 1e-3 (no dot) as a string: say how to write it
        hint = " (in YAML write the exponent with a dot, e.g. 1.0e-3)" if isinstance(v, str) and _YAML_EXP.match(v) else ""
        raise ValueError(f"must be a number, not {'a boolean' if isinstance(v, bool) else 'a string'}"
                         f" ({str(v)[:40]!r}){hint}")
    return v


#: A float field that takes JSON numbers only (an int is a number too), never "0.1" or true.
Num = Annotated[float, BeforeValidator(_number)]
#: An int field that takes JSON numbers only (an integral float such as 5.0 is still an int).
Int = Annotated[int, BeforeValidator(_number)]
#: A bool field that takes JSON booleans only, never "yes" or 1.
Bool = Annotated[bool, Strict()]


def _no_nul(v: Any) -> None:
    """Refuse a NUL character anywhere in a text value (PostgreSQL cannot store one; SQLite can:
    both backends must give the same answer)."""
    if isinstance(v, str):
        if "\x00" in v:
            raise ValueError("must not contain a NUL character")
    elif isinstance(v, dict):
        for k, x in v.items():
            _no_nul(k)
            _no_nul(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _no_nul(x)


class _Strict(BaseModel):
    """Requests refuse unknown fields, so a typo is a 422 naming it, not a silent default; and text
    with a NUL character, which one backend would store and the other refuse."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _text_without_nul(cls, v: Any) -> Any:
        _no_nul(v)
        return v


def _finite(v: float, what: str) -> float:
    if v is None or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number")
    return v


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


class OptimizerSpec(_Strict):
    n_initial: Int = Field(default=8, ge=1, le=10_000)
    seed: Int = Field(default=0, ge=0, le=2**31 - 1)
    engine: Literal["auto", "sobol", "gp", "uniform", "energy", "global", "knapsack"] = Field(
        default="auto",
        description="'auto': the one-shot allocators' points and Sobol for n_initial trials, then the GP; "
        "'sobol': Sobol only; 'uniform' | 'energy' | 'global' | 'knapsack' (compression jobs): one "
        "one-shot allocation per target R (the budget of 'constrained', else R = 0.25, 0.5, 0.75), then done",
    )


class JobCreate(_Strict):
    """``POST /api/v1/jobs``: a compression job or a generic (ask/tell) job."""

    name: str = Field(min_length=1, max_length=200)
    compression: CompressionSpec | None = None
    parameters: list[ParameterSpec] | None = Field(default=None, json_schema_extra={"minItems": 1, "maxItems": 1000})
    objective: Objective = Field(default_factory=Objective)
    budget: Budget = Field(default_factory=Budget)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)

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


# --------------------------------------------------------------------------- layer table


class CostFactor(_Strict):
    """A kept count: ``clamp(floor(theta[param] * size + 0.5), 1, size)``."""

    param: str
    size: int = Field(ge=1)


class CostTerm(_Strict):
    """``coef * product(kept counts of its factors)``; no factor means a constant."""

    coef: float
    factors: list[CostFactor] = Field(default_factory=list)


class CostForm(_Strict):
    """A layer's cost as a closed form in theta: ``min(sum(terms), cap)`` (cap = the dense cost)."""

    terms: list[CostTerm]
    cap: float | None = None


class LayerSignals(_Strict):
    """Curves of one search parameter over a theta grid, for one-shot allocators (interface of issue 13).

    ``energy[k]``: the share of the layer's importance mass kept at ``grid[k]`` (svd: singular-value
    energy; tucker2: core energy; magnitude: squared weights; channel methods: group scores).
    ``lamp[k]``: the LAMP-style score of the most important unit removed at ``grid[k]`` (0 when
    nothing is removed). ``sensitivity[m]``: the measured L of the model with only this layer
    compressed at ``sens_grid[m]`` (BatchNorm re-estimated, as trials are).
    """

    grid: list[float] = Field(min_length=2, max_length=33)
    energy: list[float] = Field(min_length=2, max_length=33)
    lamp: list[float] = Field(min_length=2, max_length=33)
    sens_grid: list[float] | None = Field(default=None, min_length=1, max_length=8)
    sensitivity: list[float] | None = Field(default=None, min_length=1, max_length=8)

    @model_validator(mode="after")
    def _curves_ok(self) -> "LayerSignals":
        k = len(self.grid)
        if len(self.energy) != k or len(self.lamp) != k:
            raise ValueError("signals: grid, energy and lamp must have one length")
        vals = [*self.grid, *self.energy, *self.lamp, *(self.sens_grid or []), *(self.sensitivity or [])]
        if not all(math.isfinite(x) for x in vals):
            raise ValueError("signals: every value must be finite")
        if any(b <= a for a, b in zip(self.grid, self.grid[1:])) or self.grid[0] <= 0 or self.grid[-1] != 1.0:
            raise ValueError("signals.grid must increase strictly in (0, 1] and end at 1.0")
        if (self.sens_grid is None) != (self.sensitivity is None):
            raise ValueError("signals: sens_grid and sensitivity come together")
        if self.sens_grid is not None and len(self.sens_grid) != len(self.sensitivity or []):
            raise ValueError("signals: sens_grid and sensitivity must have one length")
        return self


class LayerInfo(_Strict):
    name: str
    type: str = Field(description="module type, e.g. Conv2d, Linear")
    method: str
    shape: list[int] = Field(description="weight shape")
    params: list[str] = Field(description="names of the search parameters this layer's cost depends on")
    costs: dict[str, CostForm] = Field(description="cost kind -> closed form in theta")
    dense: dict[str, float] = Field(default_factory=dict, description="cost kind -> cost of the original layer")
    signals: LayerSignals | None = Field(
        default=None, description="per-layer curves for one-shot allocators (on the row named after a search parameter)"
    )


class SearchParam(_Strict):
    name: str
    low: float
    high: float
    size: int = Field(default=0, description="the count theta multiplies (rank, channels); 0 when continuous")
    dense_from: float | None = Field(
        default=None, description="theta from which the layer is left dense (1.0 when it never is before 1)"
    )


class ProfileReport(_Strict):
    """What a worker reports for a job's profiling task."""

    layers: list[LayerInfo] = Field(min_length=1)
    params: list[SearchParam] = Field(min_length=1)
    totals: dict[str, float] = Field(description="cost kind -> cost of the whole original model")
    model_info: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- trials


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


class ExportRequest(_Strict):
    """``POST /api/v1/jobs/{id}/trials/{trial_id}/export``: build the compressed model of a trial."""

    finetune_steps: Int = Field(default=0, ge=0, le=100_000, description="distillation fine-tuning steps")
    lr: Num = Field(default=1e-4, gt=0.0, le=1.0)


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


class ErrorOut(BaseModel):
    detail: str
    code: str

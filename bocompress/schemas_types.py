"""What every wire schema of bocompress shares: the API prefix, the state and name literals, and the
strict field types (numbers that are numbers, booleans that are booleans, no NUL character).

Part of the contract (:mod:`bocompress.schemas` exports all of it): only pydantic is imported.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from bocompress import states as _states
from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, field_validator

API_PREFIX = "/api/v1"

# The states' strings, from the one enum of each (bocompress.states).
TRIAL_STATES = tuple(s.value for s in _states.TrialState)
TrialState = Literal[TRIAL_STATES]  # type: ignore[valid-type]
TERMINAL_TRIAL_STATES = tuple(s.value for s in _states.TERMINAL_TRIAL_STATES)
JOB_STATES = tuple(s.value for s in _states.JobState)
JobState = Literal[JOB_STATES]  # type: ignore[valid-type]
TaskKind = Literal["profile", "evaluate", "export", "chipnet"]
Role = Literal["admin", "client", "worker"]

ZOO_MODELS = ("digits-mlp", "digits-cnn", "vgg16", "resnet20", "resnet56", "mobilenet", "transformer")
ZOO_DATA = ("digits", "digits-train", "digits32", "digits32-train", "digits-tokens", "digits-tokens-train", "synthetic")
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
METHODS = ("svd", "tucker2", "magnitude", "channel_l1", "channel_lasso")
MethodName = Literal["svd", "tucker2", "magnitude", "channel_l1", "channel_lasso"]
COST_KINDS = ("params", "flops", "channels", "activation")
CostKind = Literal["params", "flops", "channels", "activation"]
OBJECTIVE_KINDS = ("scalarized", "constrained", "pareto")


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

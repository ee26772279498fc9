"""Model specs: which installed factory builds an architecture, with which arguments (JSON only).

An architecture is named in one of three ways (the ``arch`` of an upload, the ``arch`` of an
export's description):

* a zoo name, ``digits-cnn``;
* an import path of a zero-argument factory, ``mypkg.models:small_net``;
* a **model spec**, a JSON object naming a factory and its arguments::

      {"factory": "timm:create_model", "args": ["resnet18"], "kwargs": {"num_classes": 10}}
      {"factory": "transformers:AutoModelForSequenceClassification.from_config",
       "config": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, ...}}

  ``factory`` is ``package.module:attribute`` where the attribute may be dotted
  (``AutoModelForSequenceClassification.from_config``). ``args`` and ``kwargs`` are JSON values
  passed as they are. ``config`` is a HuggingFace ``config.json``: it is turned into a config
  object with ``transformers.AutoConfig.for_model(model_type, **rest)`` and passed as the first
  argument. ``input_shape`` (one sample's shape) lets the built-in ``synthetic`` data be used.

Nothing in a spec is executed: it only selects code already installed where the model is built,
and only under the import prefixes that place allows (``bocompress worker --allow-import``;
``allow_import=`` of :func:`bocompress.load_compressed`). The service validates the JSON shape and
never imports anything. pydantic only at import time; torch and importlib work is done lazily.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bocompress.errors import BocompressError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "FACTORY_RE",
    "MAX_SPEC_BYTES",
    "ModelSpec",
    "ModelSpecError",
    "parse_arch",
    "import_allowed",
    "resolve_factory",
    "build_model",
]

#: ``package.module:attr`` or ``package.module:Class.method`` (dotted attribute).
FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: The largest model spec accepted, as JSON text (a HuggingFace config.json is a few kB).
MAX_SPEC_BYTES = 64 * 1024
#: Deepest nesting of lists/objects in a spec.
MAX_DEPTH = 16


class ModelSpecError(BocompressError, ValueError):
    """A model spec that is malformed, or names a factory that may not or cannot be imported here."""


def _depth(v: Any, d: int = 0) -> int:
    if d > MAX_DEPTH:
        return d
    if isinstance(v, dict):
        return max([_depth(x, d + 1) for x in v.values()] or [d + 1])
    if isinstance(v, list):
        return max([_depth(x, d + 1) for x in v] or [d + 1])
    return d


class ModelSpec(BaseModel):
    """A factory and its JSON arguments (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    factory: str = Field(min_length=3, max_length=200, description="package.module:attribute (attribute may be dotted)")
    args: list[Any] = Field(default_factory=list, max_length=64)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] | None = Field(default=None, description="a HuggingFace config.json (needs model_type)")
    input_shape: list[int] | None = Field(default=None, min_length=1, max_length=8)

    @field_validator("factory")
    @classmethod
    def _factory_ok(cls, v: str) -> str:
        if not FACTORY_RE.match(v):
            raise ValueError(f"{v!r} is not 'package.module:attribute' (e.g. 'timm:create_model')")
        if any(part.startswith("_") for part in v.split(":", 1)[1].split(".")):
            raise ValueError(f"{v!r}: a factory's attribute may not be private (start with '_')")
        return v

    @field_validator("kwargs")
    @classmethod
    def _kwargs_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not k.isidentifier()]
        if bad:
            raise ValueError(f"kwargs: keys must be Python identifiers, got {bad[:5]}")
        return v

    @field_validator("config")
    @classmethod
    def _config_ok(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("model_type"), str):
            raise ValueError("config: a HuggingFace config needs a string 'model_type' (e.g. 'bert')")
        return v

    @field_validator("input_shape")
    @classmethod
    def _shape_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 1 or s > 1_000_000 for s in v):
            raise ValueError("input_shape: sizes must be in 1..1000000")
        return v

    @property
    def module(self) -> str:
        return self.factory.split(":", 1)[0]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_defaults=True), sort_keys=True, separators=(",", ":"))


def parse_arch(arch: str | dict[str, Any]) -> ModelSpec | None:
    """The :class:`ModelSpec` of ``arch`` when it is a JSON object (text or dict), else None.

    Raises:
        ModelSpecError: ``arch`` looks like JSON (starts with ``{``) but is not a valid spec; the
            message names the offending field.
    """
    if isinstance(arch, dict):
        raw: Any = arch
        size = len(json.dumps(arch))
    else:
        text = arch.strip()
        if not text.startswith("{"):
            return None
        size = len(text.encode())
        if size > MAX_SPEC_BYTES:
            raise ModelSpecError(f"the model spec is {size} bytes; at most {MAX_SPEC_BYTES}")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"the model spec is not valid JSON: {exc}") from None
    if size > MAX_SPEC_BYTES:
        raise ModelSpecError(f"the model spec is {size} bytes; at most {MAX_SPEC_BYTES}")
    if not isinstance(raw, dict):
        raise ModelSpecError("the model spec must be a JSON object with a 'factory'")
    if _depth(raw) > MAX_DEPTH:
        raise ModelSpecError(f"the model spec nests deeper than {MAX_DEPTH} levels")
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise ModelSpecError(f"model spec field {where!r}: {err['msg'].replace('Value error, ', '')}") from None


def import_allowed(path: str, prefixes: Sequence[str]) -> bool:
    """Whether the import path ``package.module:attr`` starts with one of ``prefixes``.

    A prefix names a package or module (``mypkg`` allows ``mypkg:f`` and ``mypkg.models:f`` but
    not ``mypkg2.models:f``); a prefix ending in ``.`` or ``:`` is matched as a plain string prefix.
    """
    module = path.split(":", 1)[0]
    for prefix in prefixes:
        if prefix.endswith((".", ":")):
            if path.startswith(prefix):
                return True
        elif module == prefix or module.startswith(prefix + "."):
            return True
    return False


def resolve_factory(path: str, prefixes: Sequence[str], how_to_allow: str) -> Any:
    """Import ``package.module:attr[.attr]`` when a prefix allows it; the callable it names.

    Args:
        path: the factory's import path.
        prefixes: the allowed import prefixes.
        how_to_allow: the end of the refusal message (how to allow the prefix where this runs).

    Raises:
        ModelSpecError: not allowed (the message names the allowed prefixes), not importable, or
            not callable.
    """
    import importlib

    if not FACTORY_RE.match(path):
        raise ModelSpecError(f"{path!r} is not an import path 'package.module:factory'")
    if not import_allowed(path, prefixes):
        allowed = ", ".join(prefixes) if prefixes else "none"
        raise ModelSpecError(f"import path {path!r} is not allowed here (allowed prefixes: {allowed}); {how_to_allow}")
    module_name, attrs = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} for model {path!r}: {exc}") from exc
    for attr in attrs.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            raise ModelSpecError(f"{module_name!r} has no attribute {attrs!r} (model {path!r})")
    if not callable(obj):
        raise ModelSpecError(f"{path!r} is not callable")
    return obj


def build_model(arch: str | ModelSpec, prefixes: Sequence[str], how_to_allow: str = "allow its prefix") -> "nn.Module":
    """A fresh (untrained) module of ``arch``: an import path (zero-argument factory) or a spec.

    Raises:
        ModelSpecError: refused, not importable, or the factory did not return an ``nn.Module``
            (the factory's own error is included).
    """
    from torch import nn

    spec = arch if isinstance(arch, ModelSpec) else parse_arch(arch)
    path = spec.factory if spec is not None else str(arch)
    factory = resolve_factory(path, prefixes, how_to_allow)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if spec is not None:
        args, kwargs = list(spec.args), dict(spec.kwargs)
        if spec.config is not None:
            cfg = dict(spec.config)
            if not import_allowed("transformers:AutoConfig", prefixes):
                raise ModelSpecError("a spec with 'config' is built with transformers.AutoConfig: "
                                     f"allow the prefix 'transformers' ({how_to_allow})")
            try:
                from transformers import AutoConfig
            except ImportError as exc:
                raise ModelSpecError(f"a spec with 'config' needs transformers installed: {exc}") from exc
            try:
                config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            except Exception as exc:  # noqa: BLE001 - transformers' own error, reported
                raise ModelSpecError(f"the spec's config is not a valid HuggingFace config: {exc}") from exc
            args.insert(0, config)
    try:
        model = factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the factory's own error, reported with its name
        raise ModelSpecError(f"factory {path!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if spec is not None and spec.input_shape:
        try:
            model.input_shape = tuple(spec.input_shape)
        except Exception:  # noqa: BLE001 - a module that refuses attributes: synthetic data then needs it
            pass
    return model

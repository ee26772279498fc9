"""Compression methods, found by name through a lazy registry.

A method's module is imported only when that method is asked for, so a missing or broken module
(or a heavy dependency of one method) does not break the others. Each module defines one
:class:`~bocompress.worker.methods.base.Compressor` subclass (or names it ``COMPRESSOR``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from bocompress.schemas import split_layer_patterns
from bocompress.worker.methods.base import (
    TYPE_CLASSES,
    CompressionError,
    Compressor,
    CompressorOptions,
    CostMismatch,
    NoLayerMatched,
)
from bocompress.worker.methods.composite import CompositeCompressor
from bocompress.worker.methods.layerwise import LayerwiseCompressor
from bocompress.worker.methods.tracing import lenient_patterns

__all__ = [
    "METHOD_MODULES",
    "STRUCTURAL_METHODS",
    "Compressor",
    "CompressorOptions",
    "CompositeCompressor",
    "CompressionError",
    "CostMismatch",
    "NoLayerMatched",
    "available_methods",
    "build_compressor",
    "get_compressor_class",
]

#: Method name -> the module that implements it (imported on first use).
METHOD_MODULES: dict[str, str] = {
    "svd": "bocompress.worker.methods.svd",
    "tucker2": "bocompress.worker.methods.tucker2",
    "magnitude": "bocompress.worker.methods.magnitude",
    "channel_l1": "bocompress.worker.methods.channel_l1",
    "channel_lasso": "bocompress.worker.methods.channel_lasso",
}

#: Methods that change layer shapes across dependent layers (channel pruning): they cannot share a
#: model with another method in a mapping, since each would invalidate the other's caches and forms.
STRUCTURAL_METHODS = frozenset({"channel_l1", "channel_lasso"})

_CLASSES: dict[str, type[Compressor]] = {}


def available_methods() -> list[str]:
    """Names of the registered methods (whether or not their module imports)."""
    return list(METHOD_MODULES)


def get_compressor_class(method: str) -> type[Compressor]:
    """The Compressor class of a method, importing its module on first use.

    Raises:
        CompressionError: unknown method, a module that fails to import, or no unique class in it.
    """
    if method in _CLASSES:
        return _CLASSES[method]
    if method not in METHOD_MODULES:
        raise CompressionError(f"unknown compression method {method!r}; known: {sorted(METHOD_MODULES)}")
    modname = METHOD_MODULES[method]
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # a broken method must not break the others: report it when asked
        raise CompressionError(f"compression method {method!r} is unavailable: importing {modname} failed: {exc!r}") from exc
    cls = getattr(mod, "COMPRESSOR", None)
    if cls is None:
        found = [
            v for v in vars(mod).values()
            if isinstance(v, type) and issubclass(v, Compressor) and v.__module__ == modname
            and not getattr(v, "__abstractmethods__", None)
        ]
        named = [v for v in found if getattr(v, "method", "") == method]
        if len(named) == 1:
            cls = named[0]
        elif len(found) == 1:
            cls = found[0]
        else:
            raise CompressionError(
                f"module {modname} must define exactly one Compressor subclass for {method!r} "
                f"(or set COMPRESSOR); found {[c.__name__ for c in found]}"
            )
    _CLASSES[method] = cls
    return cls


def build_compressor(
    model: nn.Module,
    method: str | Mapping[str, str],
    layer_patterns: Any,
    theta_min: float,
    example_input: Tensor,
    options: CompressorOptions | None = None,
) -> Compressor:
    """Build the compressor of a job: one method, or one per layer type combined.

    Args:
        model: the trained network (not modified).
        method: a method name, or a mapping layer type -> method name, e.g.
            ``{"Conv2d": "tucker2", "Linear": "svd"}``.
        layer_patterns: the job's ``compression.layers``: fnmatch globs over module names (each
            must match a compressible layer), where ``"!glob"`` excludes; or
            ``{"include": [...], "exclude": [...]}``. Excluded layers get no search parameter and
            stay dense; an exclude pattern must match some module of the model.
        theta_min: the lowest theta searched.
        example_input: ``batch x input shape``, to trace spatial sizes and FLOPs.
        options: the job's cost kind, calibration inputs, least-squares switch
            (:class:`CompressorOptions`); the exclusions found in ``layer_patterns`` are added.

    Returns:
        A :class:`Compressor` (a :class:`CompositeCompressor` when a mapping names several methods).

    Raises:
        NoLayerMatched: a pattern matches no layer that its method can compress, or an exclude
            pattern matches no module.
        CompressionError: unknown method or type, or channel pruning mixed with another method.
    """
    try:
        include, exclude = split_layer_patterns(layer_patterns)
    except ValueError as exc:
        raise CompressionError(str(exc)) from exc
    names = [n for n, _ in model.named_modules() if n]
    stray = [p for p in exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if stray:
        raise NoLayerMatched(f"exclude pattern(s) {stray} match no module of the model", stray, method)
    options = options or CompressorOptions()
    options = dataclasses.replace(options, exclude=tuple(dict.fromkeys([*options.exclude, *exclude])))
    layer_patterns = include
    if isinstance(method, str):
        return get_compressor_class(method)(model, list(layer_patterns), theta_min, example_input, method, options)
    mapping = dict(method)
    if not mapping:
        raise CompressionError("the method mapping is empty")
    for k, v in mapping.items():
        if k not in TYPE_CLASSES:
            raise CompressionError(f"method mapping key {k!r}: use one of {sorted(TYPE_CLASSES)}")
        if v not in METHOD_MODULES:
            raise CompressionError(f"method mapping {k!r}: unknown method {v!r}; known: {sorted(METHOD_MODULES)}")
    methods = list(dict.fromkeys(mapping.values()))
    if len(methods) == 1:
        return get_compressor_class(methods[0])(model, list(layer_patterns), theta_min, example_input, mapping, options)
    structural = [m for m in methods if m in STRUCTURAL_METHODS]
    if structural:
        raise CompressionError(
            f"channel pruning ({structural}) changes the shapes of dependent layers and cannot be mixed "
            f"with other methods in one mapping ({mapping}); use a single method"
        )
    named = [(n, m) for n, m in model.named_modules() if n]
    parts = []
    for meth in methods:
        types = [TYPE_CLASSES[t] for t, v in mapping.items() if v == meth]
        pats = [
            p for p in layer_patterns
            if any(isinstance(m, tuple(types)) and fnmatch.fnmatchcase(n, p) for n, m in named)
        ]
        if not pats:
            continue
        cls = get_compressor_class(meth)
        if not issubclass(cls, LayerwiseCompressor):
            raise CompressionError(f"method {meth!r} cannot be combined with others in a mapping")
        try:
            with lenient_patterns():
                parts.append(cls(model, pats, theta_min, example_input, mapping, options))
        except NoLayerMatched:
            continue
    covered = [n for part in parts for n in part.plans]
    unmatched = [p for p in layer_patterns if not any(fnmatch.fnmatchcase(n, p) for n in covered)]
    if unmatched or not parts:
        skipped = {n: r for part in parts for n, r in part.skipped.items()}
        extra = f" (matched but not compressible: {skipped})" if skipped else ""
        raise NoLayerMatched(
            f"layer pattern(s) {unmatched or list(layer_patterns)} match no layer that {mapping} can compress{extra}",
            unmatched or list(layer_patterns),
            mapping,
        )
    if len(parts) == 1:
        return parts[0]
    return CompositeCompressor(model, parts, mapping)

"""Which layers a method compresses, and what they look like on the example input.

:func:`select_modules` and :func:`method_types` pick the layers (fnmatch patterns over module
names, layer types mapped to the method); :func:`check_patterns` refuses a pattern that matches
nothing (unless :func:`lenient_patterns`); :func:`trace_layers` records each layer's spatial sizes
and the model's FLOPs with one forward pass; :func:`set_submodule` swaps a layer in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bocompress.worker import batch as B
from bocompress.worker.methods.base import TYPE_CLASSES, CompressionError, NoLayerMatched, eval_mode, input_batch_size

__all__ = [
    "LayerTrace",
    "check_patterns",
    "lenient_patterns",
    "method_types",
    "select_modules",
    "set_submodule",
    "trace_layers",
]


@dataclass
class LayerTrace:
    """What a forward pass tells about one layer (sums over the calls of one forward pass).

    Attributes:
        calls: how many times the layer ran in one forward pass.
        pos_in: input positions per sample (``H_in * W_in`` for a conv, 1 for a flat Linear input).
        pos_out: output positions per sample (``H_out * W_out`` for a conv).
    """

    calls: int = 0
    pos_in: int = 0
    pos_out: int = 0


def _positions(t: Tensor, channels: int, batch: int, channel_dim: int) -> int:
    """Positions per sample of a ``batch x ... `` activation with ``channels`` along ``channel_dim``."""
    if t.dim() < 2 or t.shape[channel_dim] != channels:
        raise CompressionError(f"unexpected activation shape {tuple(t.shape)} for {channels} channels")
    n = t.numel() // (batch * channels)
    if n * batch * channels != t.numel():
        raise CompressionError(f"activation shape {tuple(t.shape)} does not split into batch {batch}")
    return int(n)


def trace_layers(model: nn.Module, example_input: Tensor, names: Sequence[str]) -> tuple[dict[str, LayerTrace], float]:
    """Run one forward pass recording the spatial sizes of the named Conv2d/Linear layers.

    Args:
        model: the network (eval mode is forced during the pass and restored).
        example_input: ``batch x input shape``.
        names: module names (from ``named_modules``) of Conv2d or Linear layers.

    Returns:
        ``(traces, flops_per_sample)``: a :class:`LayerTrace` per name and the total FLOPs per
        sample counted by FlopCounterMode during the same pass.
    """
    b = input_batch_size(example_input)
    modules = dict(model.named_modules())
    traces = {n: LayerTrace() for n in names}
    handles = []

    def make_hook(name: str, mod: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            x = args[0]
            tr = traces[name]
            tr.calls += 1
            if isinstance(mod, nn.Conv2d):
                tr.pos_in += _positions(x, mod.in_channels, b, 1)
                tr.pos_out += _positions(out, mod.out_channels, b, 1)
            else:
                tr.pos_in += _positions(x, mod.in_features, b, -1)
                tr.pos_out += _positions(out, mod.out_features, b, -1)

        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(make_hook(n, modules[n])))
    counter = FlopCounterMode(display=False)
    try:
        with eval_mode(model), torch.no_grad(), counter:
            B.call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return traces, float(counter.get_total_flops()) / b


def method_types(method: str, method_map: str | Mapping[str, str], supported: Sequence[str]) -> list[str]:
    """The layer-type names (``Conv2d``, ``Linear``) a method takes under the job's method spec.

    Args:
        method: this compressor's method name.
        method_map: the job's method: a name (every supported type) or a mapping type -> method.
        supported: the type names the method can compress.

    Returns:
        The supported type names mapped to ``method`` (all of ``supported`` for a plain name).
    """
    if isinstance(method_map, str):
        if method_map != method:
            raise CompressionError(f"compressor {method!r} was built for method {method_map!r}")
        return list(supported)
    for k in method_map:
        if k not in TYPE_CLASSES:
            raise CompressionError(f"method mapping key {k!r}: use one of {sorted(TYPE_CLASSES)}")
    return [t for t in supported if method_map.get(t) == method]


def _is_type(module: nn.Module, type_names: Sequence[str]) -> bool:
    return any(isinstance(module, TYPE_CLASSES[t]) for t in type_names)


def select_modules(model: nn.Module, patterns: Sequence[str], type_names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Modules of the given types whose name matches any fnmatch pattern, in ``named_modules`` order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and _is_type(m, type_names) and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]


_LENIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("bocompress_lenient_patterns", default=False)


@contextlib.contextmanager
def lenient_patterns() -> Iterator[None]:
    """Within this block, a compressor raises :class:`NoLayerMatched` only when NO pattern matched.

    Used by the composite compressor, which checks the patterns against the union of its parts.
    """
    token = _LENIENT.set(True)
    try:
        yield
    finally:
        _LENIENT.reset(token)


def check_patterns(
    patterns: Sequence[str],
    compressible: Sequence[str],
    method: Any,
    skipped: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`NoLayerMatched` for the patterns that match none of the compressible layers.

    Args:
        patterns: the job's layer globs.
        compressible: names of the layers the method will search over.
        method: the method or mapping, for the message.
        skipped: layer name -> why it was matched but not compressible (shown in the message).
    """
    lenient = _LENIENT.get()
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in compressible)]
    if not unmatched or (lenient and compressible):
        return
    if lenient:
        unmatched = list(patterns)
    msg = f"layer pattern(s) {unmatched} match no layer that method {method!r} can compress"
    if skipped:
        related = {n: r for n, r in skipped.items() if any(fnmatch.fnmatchcase(n, p) for p in unmatched)}
        if related:
            shown = "; ".join(f"{n}: {r}" for n, r in list(related.items())[:10])
            more = f" (+{len(related) - 10} more)" if len(related) > 10 else ""
            msg += f" (matched but not compressible: {shown}{more})"
    raise NoLayerMatched(msg, unmatched, method)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) in ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

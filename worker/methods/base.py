"""The compression-method protocol shared by every method, and the machinery most methods reuse.

A :class:`Compressor` is built once per (job, worker). Its constructor does the expensive work
once (finding the layers, tracing spatial sizes, full SVD / HOSVD factors, sorted magnitudes) so
that :meth:`Compressor.apply` costs about a truncation. :meth:`Compressor.profile` returns the
layer table with each layer's cost as a closed form in theta (``bocompress.schemas.CostForm``);
the service computes R(theta) from it exactly with :func:`bocompress.costs.ratio`, and
``worker.evaluate`` checks that this exact ratio equals the one measured on the compressed module.

Cost conventions (every method follows them, so forms and measurements agree):

* ``params``: ``sum(p.numel() for p in module.parameters())`` (:meth:`Compressor.count_params`;
  a method that zeroes weights instead of removing them overrides it to count nonzeros).
* ``flops``: what :class:`torch.utils.flop_counter.FlopCounterMode` counts for one forward pass,
  divided by the batch size (flops per sample). It counts ``2 * MACs`` of convolutions and matrix
  products and ignores biases, normalization and activations; a layer's form therefore scales with
  the number of output positions (``H_out * W_out`` for a conv), measured by a forward hook when
  the compressor is built.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bocompress.costs import kept
from bocompress.schemas import ProfileReport
from worker import batch as B

__all__ = [
    "CompressionError",
    "NoLayerMatched",
    "CostMismatch",
    "Compressor",
    "LayerwiseCompressor",
    "CompositeCompressor",
    "LayerTrace",
    "LayerPlan",
    "TYPE_CLASSES",
    "measure_flops",
    "trace_layers",
    "select_modules",
    "method_types",
    "theta_value",
    "set_submodule",
    "eval_mode",
    "break_even",
    "signal_grid",
    "importance_curves",
    "signals_dict",
    "CompressorOptions",
    "lenient_patterns",
    "check_patterns",
    "form",
    "dense_costs",
]

#: Layer-type names usable as keys of a method mapping, and the module classes they stand for.
TYPE_CLASSES: dict[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}


# --------------------------------------------------------------------------- errors


class CompressionError(Exception):
    """A compression method cannot do what was asked (bad layer, bad theta, inconsistent cost)."""


class NoLayerMatched(CompressionError, ValueError):
    """A layer pattern matched no layer the method can compress.

    Attributes:
        patterns: the patterns that matched nothing compressible.
        method: the method (or mapping) asked for.
    """

    def __init__(self, message: str, patterns: Sequence[str] = (), method: Any = None) -> None:
        super().__init__(message)
        self.patterns = list(patterns)
        self.method = method


class CostMismatch(CompressionError):
    """The exact cost ratio from the profile disagrees with the one measured on the module.

    Attributes:
        kind: the cost kind (``params``, ``flops``...).
        measured: the ratio measured on the compressed module.
        exact: the ratio computed from the profile's cost forms.
    """

    def __init__(self, kind: str, measured: float, exact: float, detail: str = "") -> None:
        msg = (
            f"cost mismatch for {kind!r}: measured ratio {measured:.6f} vs exact ratio from the "
            f"profile {exact:.6f} (relative difference {abs(measured - exact) / max(abs(exact), 1e-300):.3%})"
        )
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)
        self.kind = kind
        self.measured = measured
        self.exact = exact


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CompressorOptions:
    """What a job tells a compressor beyond the method, the layers and theta_min.

    Attributes:
        cost_kind: the job's cost (``params``, ``flops``...). A factorized layer is left dense
            where its factorization is no cheaper in THIS cost, so the job's cost form is exact
            for every theta in [theta_min, 1] (see :func:`break_even`).
        exclude: fnmatch globs of layers never compressed (no search parameter; left dense).
        calib_inputs: calibration inputs (``N x ...`` or a dict batch) for data-aware steps (the
            least-squares corrections); None: the example input.
        ls_correction: least-squares reconstruction after compressing; None: the method's default.
        n_points: sampled output positions per layer for the least squares.
        seed: seed of that sampling.
    """

    cost_kind: str = "params"
    exclude: tuple[str, ...] = ()
    calib_inputs: Any = None
    ls_correction: bool | None = None
    n_points: int = 2000
    seed: int = 0


# --------------------------------------------------------------------------- the protocol


class Compressor(ABC):
    """Built once per (job, worker): holds the original model and the per-layer caches.

    Subclasses compute their caches (full SVD/HOSVD factors, sorted magnitudes...) in
    ``__init__`` and never modify ``model``: :meth:`apply` returns a new module.

    Args:
        model: the trained network f* (not modified).
        layer_patterns: fnmatch globs over ``model.named_modules()`` names; each must match at
            least one layer the method can compress, else :class:`NoLayerMatched`.
        theta_min: the lowest keep-fraction searched (the ``low`` of every search parameter).
        example_input: a batch of inputs, ``batch x input shape``, used to trace spatial sizes
            and FLOPs (flops are reported per sample).
        method_map: the job's method, a name or a mapping layer type -> name (e.g.
            ``{"Conv2d": "tucker2", "Linear": "svd"}``); a compressor takes only the layer types
            mapped to it.
    """

    #: The registry name of the method (``svd``, ``tucker2``...).
    method: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        layer_patterns: list[str],
        theta_min: float,
        example_input: Tensor,
        method_map: str | dict[str, str],
        options: CompressorOptions | None = None,
    ) -> None:
        if isinstance(layer_patterns, str):
            layer_patterns = [layer_patterns]
        if not layer_patterns or not all(isinstance(p, str) and p for p in layer_patterns):
            raise CompressionError(f"layer_patterns must be a non-empty list of globs, got {layer_patterns!r}")
        if not (0.0 < float(theta_min) < 1.0):
            raise CompressionError(f"theta_min must be in (0, 1), got {theta_min!r}")
        self.model = model
        self.layer_patterns = list(layer_patterns)
        self.theta_min = float(theta_min)
        self.example_input = example_input
        self.method_map = method_map
        self.options = options or CompressorOptions()
        self.exclude = list(self.options.exclude)

    def excluded(self, name: str) -> bool:
        """Whether module ``name`` matches one of the job's exclude patterns."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def changed_layers(self, theta: Mapping[str, float]) -> list[str]:
        """Names of the modules ``apply(theta)`` changes (default: every layer of the table).

        The BatchNorm re-estimation after compressing resets only the BatchNorm layers that run
        after the first changed module, so an unchanged model is measured as it is.
        """
        return [lay["name"] for lay in self.profile()["layers"]]

    @abstractmethod
    def profile(self) -> dict:
        """The layer table: a dict valid as :class:`bocompress.schemas.ProfileReport`.

        Holds ``layers`` (LayerInfo dicts with cost forms), ``params`` (SearchParam dicts with
        ``low = theta_min``, ``high`` and ``size``), ``totals`` (cost of the whole original model
        per cost kind) and ``model_info``.
        """

    @abstractmethod
    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A new compressed module for ``theta`` (search-parameter name -> value); the original is untouched."""

    # -- measured costs (evaluate compares them with the exact forms) ---------------------------

    def count_params(self, module: nn.Module) -> int:
        """The measured parameter count of ``module`` (default: the sum of ``numel``)."""
        return int(sum(p.numel() for p in module.parameters())) + int(self._params_adjust(module))

    def count_flops(self, module: nn.Module, inputs: Tensor) -> float:
        """The measured FLOPs per sample of ``module`` on ``inputs`` (``batch x input shape``)."""
        return measure_flops(module, inputs) + float(self._flops_adjust(module))

    def count_cost(self, module: nn.Module, kind: str, inputs: Tensor) -> float:
        """The measured cost of ``module`` for a cost kind; methods knowing more kinds override it."""
        if kind == "params":
            return float(self.count_params(module))
        if kind == "flops":
            return self.count_flops(module, inputs)
        raise CompressionError(f"method {self.method or type(self).__name__!r} cannot measure cost kind {kind!r}")

    def _params_adjust(self, module: nn.Module) -> int:
        """Correction added to the numel sum (e.g. minus the zeroed weights of a pruned layer)."""
        return 0

    def _flops_adjust(self, module: nn.Module) -> float:
        """Correction added to FlopCounterMode's count (e.g. minus the MACs of zeroed weights)."""
        return 0.0


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (no BatchNorm statistics update) and restore every flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def _batch_size(inputs: B.Batch) -> int:
    try:
        n = B.n_samples(inputs)
    except B.BatchError as exc:
        raise CompressionError(f"inputs must be a non-empty batch: {exc}") from exc
    if n == 0:
        raise CompressionError("inputs must be a non-empty batch, got 0 samples")
    return n


def measure_flops(module: nn.Module, inputs: Tensor) -> float:
    """FLOPs per sample of one forward pass, as :class:`FlopCounterMode` counts them.

    Args:
        module: the network (run in eval mode, without gradients; its flags are restored).
        inputs: ``batch x input shape``, on the module's device.

    Returns:
        The total FLOPs divided by the batch size.
    """
    b = _batch_size(inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        B.call(module, inputs)
    return float(counter.get_total_flops()) / b


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
    b = _batch_size(example_input)
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


def theta_value(theta: Mapping[str, float], name: str) -> float:
    """``theta[name]`` as a float, with a clear error when it is missing or not finite."""
    if name not in theta:
        raise CompressionError(f"theta has no value for search parameter {name!r}")
    v = float(theta[name])
    if not math.isfinite(v):
        raise CompressionError(f"theta[{name!r}] must be finite, got {v!r}")
    return v


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) in ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def break_even(
    sizes: Sequence[int],
    cost: Callable[[tuple[int, ...]], tuple[float, float]],
    dense: tuple[float, float],
    theta_min: float,
    rule: str = "params",
) -> tuple[float, dict[str, bool]] | str:
    """Where a factorized layer stops saving, for a search range of [theta_min, 1] ("leave it dense").

    The layer's ranks are ``kept(theta, s)`` for each ``s`` in ``sizes``. It is factorized only
    where that is cheaper than the dense layer in the ``rule`` cost (the job's cost kind:
    ``params`` or ``flops``), and left dense from there on (costs grow with the ranks, so the
    dense thetas are ``[dense_from, 1]``). The ``rule`` form ``min(terms, cap=dense)`` is then
    exact for every theta. The other kind's capped form is exact too whenever, for every rank
    tuple, "cheaper in params" and "cheaper in flops" agree (true when a layer's input and output
    spatial sizes agree); where they do not (a strided k x k conv under tucker2), the other kind
    is exact outside a narrow band of theta below the break-even, and ``exact[kind]`` says so.

    Args:
        sizes: the counts theta multiplies (e.g. ``[c_in, c_out]``).
        cost: rank tuple -> ``(params, flops)`` of the factorized layer.
        dense: ``(params, flops)`` of the dense layer.
        theta_min: the lowest theta searched.
        rule: ``params`` or ``flops``: which cost decides "cheaper".

    Returns:
        ``(dense_from, exact)``: the smallest theta at which the layer is left dense (a rank
        breakpoint; 1.0 when only full rank is) and ``{"params": bool, "flops": bool}``, whether
        each capped form is exact for every theta. A string (the reason) when the factorization
        saves nothing at theta_min.
    """
    d = 1 if rule == "flops" else 0

    def ranks(theta: float) -> tuple[int, ...]:
        return tuple(kept(theta, s) for s in sizes)

    def cheap(r: tuple[int, ...]) -> bool:
        return cost(r)[d] < dense[d]

    # Every rank tuple reachable: at 0, 1, each breakpoint and between consecutive breakpoints.
    bps = sorted({(j + 0.5) / s for s in sizes for j in range(1, s)})
    probes = [0.0, 1.0, *bps] + [(a + b) / 2 for a, b in zip(bps, bps[1:])]
    exact = {"params": True, "flops": True}
    for t in probes:
        r = ranks(t)
        c = cost(r)
        is_cheap = cheap(r)
        for i, kind in enumerate(("params", "flops")):
            actual = c[i] if is_cheap else dense[i]
            if min(c[i], dense[i]) != actual:
                exact[kind] = False
    if not cheap(ranks(theta_min)):
        return f"the factorization is no cheaper ({rule}) than the dense layer even at theta_min={theta_min}"
    # ranks just past a breakpoint (a breakpoint itself may round either way in floating point)
    dense_from = next((b for b in bps if b > theta_min and not cheap(ranks(b + 1e-12))), 1.0)
    return float(min(dense_from, 1.0)), exact


def signal_grid(theta_min: float, points: int = 33) -> list[float]:
    """The theta grid of the allocator signals: ``points`` evenly spaced values in [theta_min, 1], ending at 1.0."""
    k = points - 1
    grid = [theta_min + (1.0 - theta_min) * i / k for i in range(k)] + [1.0]
    return [float(x) for x in grid]


def importance_curves(values_desc: Tensor, kept_counts: Sequence[int]) -> tuple[list[float], list[float]]:
    """Energy kept and the LAMP score of the first unit removed, for several kept counts.

    Args:
        values_desc: ``n`` non-negative unit importances (sigma^2, w^2, a group score), largest first.
        kept_counts: how many of the largest units are kept, one per grid point (``n``: all).

    Returns:
        ``(energy, lamp)``: ``energy[k] = sum(v[:c]) / sum(v)`` (1.0 when ``c = n``) and
        ``lamp[k] = v[c] / sum(v[:c + 1])`` (LAMP, Lee et al. 2021: a unit's importance relative to
        every unit at least as important; 0.0 when nothing is removed). Made monotone over the
        grid (energy non-decreasing, lamp non-increasing) against float rounding.
    """
    v = values_desc.detach().to("cpu", torch.float64).clamp_min(0).flatten()
    n = v.numel()
    csum = torch.cumsum(v, 0)
    total = float(csum[-1]) if n else 0.0
    energy, lamp = [], []
    for c in kept_counts:
        c = int(min(max(c, 0), n))
        if c >= n:
            energy.append(1.0)
            lamp.append(0.0)
            continue
        energy.append(float(csum[c - 1]) / total if c > 0 and total > 0 else 0.0)
        denom = float(csum[c])
        lamp.append(float(v[c]) / denom if denom > 0 else 0.0)
    for i in range(1, len(energy)):
        energy[i] = max(energy[i], energy[i - 1])
        lamp[i] = min(lamp[i], lamp[i - 1])
    return energy, lamp


def signals_dict(grid: Sequence[float], energy: Sequence[float], lamp: Sequence[float]) -> dict[str, list[float]]:
    """A LayerSignals dict; the last point (theta = 1) keeps everything: energy 1, lamp 0."""
    e, s = [float(x) for x in energy], [float(x) for x in lamp]
    e[-1], s[-1] = 1.0, 0.0
    return {"grid": [float(t) for t in grid], "energy": e, "lamp": s}


# --------------------------------------------------------------------------- layer-wise methods


@dataclass
class LayerPlan:
    """One compressible layer: its row of the layer table and the method's cache.

    Attributes:
        name: module name.
        info: the LayerInfo dict (name, type, method, shape, params, costs, dense).
        param: the SearchParam dict of its theta (name, low, high, size).
        cache: method-specific data (factors, sorted indices, ranks' cost function...).
    """

    name: str
    info: dict[str, Any]
    param: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)


def form(terms: Sequence[tuple[float, Sequence[tuple[str, int]]]], cap: float | None) -> dict[str, Any]:
    """A CostForm dict from ``(coef, [(param, size), ...])`` terms (zero coefficients dropped)."""
    return {
        "terms": [
            {"coef": float(c), "factors": [{"param": p, "size": int(s)} for p, s in fs]} for c, fs in terms if c != 0
        ],
        "cap": None if cap is None else float(cap),
    }


class LayerwiseCompressor(Compressor):
    """A method that compresses each selected layer independently, with one theta per layer.

    Subclasses set ``method`` and ``supported`` and implement :meth:`plan_layer` (build the cache
    and cost forms of one layer, or say why it cannot be compressed) and :meth:`compress_layer`
    (the replacement of one layer for a theta, or ``None`` to keep it). The search parameter of a
    layer is named after the layer.
    """

    #: Layer-type names the method can compress (keys of :data:`TYPE_CLASSES`).
    supported: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        layer_patterns: list[str],
        theta_min: float,
        example_input: Tensor,
        method_map: str | dict[str, str],
        options: CompressorOptions | None = None,
    ) -> None:
        super().__init__(model, layer_patterns, theta_min, example_input, method_map, options)
        types = method_types(self.method, method_map, self.supported)
        candidates = select_modules(model, self.layer_patterns, types)
        self.skipped: dict[str, str] = {}
        for name, _ in candidates:
            if self.excluded(name):
                self.skipped[name] = "excluded by the job's layer patterns (left dense)"
        candidates = [(n, m) for n, m in candidates if n not in self.skipped]
        self.traces, flops_total = trace_layers(model, example_input, [n for n, _ in candidates])
        self.plans: dict[str, LayerPlan] = {}
        self.grid = signal_grid(self.theta_min)
        for name, mod in candidates:
            with torch.no_grad():
                plan = self.plan_layer(name, mod, self.traces[name])
            if isinstance(plan, str):
                self.skipped[name] = plan
            else:
                with torch.no_grad():
                    energy, lamp = self.layer_curves(plan, self.grid)
                plan.info["signals"] = signals_dict(self.grid, energy, lamp)
                plan.param.setdefault("dense_from", 1.0)
                self.plans[name] = plan
        check_patterns(self.layer_patterns, list(self.plans), method_map, self.skipped)
        self.totals: dict[str, float] = {
            "params": float(sum(p.numel() for p in model.parameters())),
            "flops": flops_total,
        }
        report = {
            "layers": [p.info for p in self.plans.values()],
            "params": [p.param for p in self.plans.values()],
            "totals": dict(self.totals),
            "model_info": {
                "class": type(model).__name__,
                "method": method_map if isinstance(method_map, str) else dict(method_map),
                "n_layers": len(self.plans),
                "skipped": dict(self.skipped),
                "batch_traced": int(example_input.shape[0]),
                "flops_per": "sample",
            },
        }
        self._profile = ProfileReport.model_validate(report).model_dump()

    # -- to implement -------------------------------------------------------------------------

    @abstractmethod
    def plan_layer(self, name: str, module: nn.Module, trace: LayerTrace) -> LayerPlan | str:
        """The plan of one layer (cache + cost forms), or the reason it cannot be compressed."""

    @abstractmethod
    def compress_layer(self, plan: LayerPlan, module: nn.Module, theta: float) -> nn.Module | None:
        """The replacement of the layer for ``theta``, or ``None`` to keep ``module`` as it is.

        ``module`` is the layer in the copy being compressed (same weights as the original); a
        method may modify it in place and return it.
        """

    @abstractmethod
    def layer_curves(self, plan: LayerPlan, grid: Sequence[float]) -> tuple[list[float], list[float]]:
        """``(energy, lamp)`` of one layer over ``grid`` (see :class:`bocompress.schemas.LayerSignals`)."""

    def layer_changed(self, plan: LayerPlan, theta: float) -> bool:
        """Whether ``compress_layer`` changes the layer at ``theta`` (default: unless theta keeps all)."""
        return float(theta) < float(plan.param.get("dense_from") or 1.0)

    def changed_layers(self, theta: Mapping[str, float]) -> list[str]:
        """The planned layers that ``apply(theta)`` changes."""
        return [n for n, p in self.plans.items() if self.layer_changed(p, theta_value(theta, p.param["name"]))]

    # -- the protocol -------------------------------------------------------------------------

    def profile(self) -> dict:
        """The layer table (see :meth:`Compressor.profile`); computed once, returned as a copy."""
        return copy.deepcopy(self._profile)

    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A deep copy of the model with every planned layer compressed at its theta."""
        out = copy.deepcopy(self.model)
        self.apply_to(out, theta)
        return out

    def apply_to(self, module: nn.Module, theta: Mapping[str, float]) -> None:
        """Compress, in place, the planned layers of ``module`` (a copy of the original model)."""
        values = {name: theta_value(theta, plan.param["name"]) for name, plan in self.plans.items()}
        with torch.no_grad():
            for name, plan in self.plans.items():
                layer = module.get_submodule(name)
                new = self.compress_layer(plan, layer, values[name])
                if new is not None and new is not layer:
                    new.train(layer.training)
                    set_submodule(module, name, new)

    @property
    def param_names(self) -> list[str]:
        """Names of the search parameters, in layer order."""
        return [p.param["name"] for p in self.plans.values()]


def dense_costs(module: nn.Module, trace: LayerTrace) -> tuple[int, int, float]:
    """``(weight numel, bias numel, flops per sample)`` of a dense Conv2d or Linear layer."""
    w = module.weight.numel()
    b = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    return int(w), int(b), 2.0 * trace.pos_out * w


# --------------------------------------------------------------------------- several methods at once


class CompositeCompressor(Compressor):
    """Several layer-wise methods over disjoint layer types, as one compressor.

    Built by ``build_compressor`` for a mapping such as ``{"Conv2d": "tucker2", "Linear": "svd"}``
    (the paper's VGG-16 recipe). Its profile concatenates the parts' layer tables and search
    parameters; :meth:`apply` copies the model once and lets each part compress its layers in turn.

    Args:
        model: the original network.
        parts: the per-method compressors (each with ``apply_to``), over disjoint layers.
        method_map: the mapping they were built from.
    """

    method = "composite"

    def __init__(self, model: nn.Module, parts: Sequence[LayerwiseCompressor], method_map: Mapping[str, str]) -> None:
        if not parts:
            raise CompressionError("a composite compressor needs at least one part")
        first = parts[0]
        super().__init__(model, first.layer_patterns, first.theta_min, first.example_input, dict(method_map), first.options)
        self.parts = list(parts)
        profiles = [p.profile() for p in self.parts]
        names: set[str] = set()
        layers, params = [], []
        for prof in profiles:
            for layer in prof["layers"]:
                if layer["name"] in names:
                    raise CompressionError(f"layer {layer['name']!r} is claimed by two methods")
                names.add(layer["name"])
                layers.append(layer)
            params.extend(prof["params"])
        totals = dict(profiles[0]["totals"])
        for prof in profiles[1:]:
            for k, v in prof["totals"].items():
                if k in totals and abs(totals[k] - v) > 1e-9 * max(1.0, abs(v)):
                    raise CompressionError(f"parts disagree on the model's total {k}: {totals[k]} vs {v}")
                totals.setdefault(k, v)
        skipped: dict[str, str] = {}
        for prof in profiles:
            skipped.update(prof["model_info"].get("skipped", {}))
        info = dict(profiles[0]["model_info"])
        info.update({"method": dict(method_map), "n_layers": len(layers), "skipped": skipped,
                     "parts": [p.method for p in self.parts]})
        report = {"layers": layers, "params": params, "totals": totals, "model_info": info}
        self._profile = ProfileReport.model_validate(report).model_dump()

    def profile(self) -> dict:
        """The merged layer table of all parts."""
        return copy.deepcopy(self._profile)

    def changed_layers(self, theta: Mapping[str, float]) -> list[str]:
        """The layers any part changes."""
        return [n for part in self.parts for n in part.changed_layers(theta)]

    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A deep copy of the model compressed by every part in turn."""
        out = copy.deepcopy(self.model)
        for part in self.parts:
            part.apply_to(out, theta)
        return out

    def _params_adjust(self, module: nn.Module) -> int:
        return sum(p._params_adjust(module) for p in self.parts)

    def _flops_adjust(self, module: nn.Module) -> float:
        return sum(p._flops_adjust(module) for p in self.parts)

"""The compression-method protocol shared by every method: errors, options, :class:`Compressor`.

A :class:`Compressor` is built once per (job, worker). Its constructor does the expensive work
once (finding the layers, tracing spatial sizes, full SVD / HOSVD factors, sorted magnitudes) so
that :meth:`Compressor.apply` costs about a truncation. :meth:`Compressor.profile` returns the
layer table with each layer's cost as a closed form in theta (``bocompress.schemas.CostForm``);
the service computes R(theta) from it exactly with :func:`bocompress.costs.ratio`, and
``bocompress.worker.evaluate`` checks that this exact ratio equals the one measured on the compressed module.

Cost conventions (every method follows them, so forms and measurements agree):

* ``params``: ``sum(p.numel() for p in module.parameters())`` (:meth:`Compressor.count_params`;
  a method that zeroes weights instead of removing them overrides it to count nonzeros).
* ``flops``: what :class:`torch.utils.flop_counter.FlopCounterMode` counts for one forward pass,
  divided by the batch size (flops per sample). It counts ``2 * MACs`` of convolutions and matrix
  products and ignores biases, normalization and activations; a layer's form therefore scales with
  the number of output positions (``H_out * W_out`` for a conv), measured by a forward hook when
  the compressor is built.

The machinery most methods reuse is in modules of its own: :mod:`bocompress.worker.methods.tracing` (layer
selection by pattern and type, spatial sizes), :mod:`bocompress.worker.methods.signals` (break-even bounds,
the energy and LAMP curves of a profile), :mod:`bocompress.worker.methods.layerwise` (the base class of the
per-layer methods) and :mod:`bocompress.worker.methods.composite` (several methods over disjoint layer types).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bocompress.worker import batch as B

__all__ = [
    "TYPE_CLASSES",
    "CompressionError",
    "Compressor",
    "CompressorOptions",
    "CostMismatch",
    "NoLayerMatched",
    "eval_mode",
    "input_batch_size",
    "measure_flops",
    "theta_value",
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

    def unrepaired_layers(self, theta: Mapping[str, float]) -> list[str]:
        """The changed modules whose OUTPUT is not reconstructed by the method's least squares.

        BatchNorm statistics are re-estimated only downstream of these (a layer refitted to
        reproduce the original's output leaves the BatchNorm after it with the right statistics,
        and re-estimating them on a small calibration set only adds noise: see docs/proxy.md).
        Default: every changed module.
        """
        return self.changed_layers(theta)

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


def forward_hooked(model: nn.Module, inputs: B.Batch, modules: Iterable[nn.Module], hook: Callable[..., Any],
                   *, pre: bool = False) -> None:
    """One forward pass of ``inputs`` in eval mode without gradients, with ``hook`` on ``modules``.

    ``hook`` is a forward hook (``pre=False``: ``hook(module, args, output)``) or a forward pre-hook
    (``hook(module, args)``); it is removed from every module afterwards, whatever happens.
    """
    handles = [m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook) for m in modules]
    try:
        with eval_mode(model), torch.no_grad():
            B.call(model, inputs)
    finally:
        for h in handles:
            h.remove()


def input_batch_size(inputs: B.Batch) -> int:
    """The number of samples of a batch of inputs (:class:`CompressionError` when it has none)."""
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
    b = input_batch_size(inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        B.call(module, inputs)
    return float(counter.get_total_flops()) / b


def theta_value(theta: Mapping[str, float], name: str) -> float:
    """``theta[name]`` as a float, with a clear error when it is missing or not finite."""
    if name not in theta:
        raise CompressionError(f"theta has no value for search parameter {name!r}")
    v = float(theta[name])
    if not math.isfinite(v):
        raise CompressionError(f"theta[{name!r}] must be finite, got {v!r}")
    return v

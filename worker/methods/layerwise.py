"""The base class of the per-layer methods (svd, tucker2, magnitude): one search parameter per layer.

A :class:`LayerwiseCompressor` subclass plans each layer once (:class:`LayerPlan`: its search
parameter, cost form and caches) and compresses it for a theta; the base class builds the layer
table, checks the forms against a compressed copy, and applies the least-squares refit.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bocompress.schemas import ProfileReport
from bocompress.worker import batch as B
from bocompress.worker.methods.base import Compressor, CompressorOptions, input_batch_size, theta_value
from bocompress.worker.methods.signals import signal_grid, signals_dict
from bocompress.worker.methods.tracing import LayerTrace, check_patterns, method_types, select_modules, set_submodule, trace_layers

__all__ = ["LayerPlan", "LayerwiseCompressor", "dense_costs", "form", "run_ls_refit"]


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


def layer_info(name: str, module: nn.Module, method: str, params: dict[str, Any], flops: dict[str, Any],
               dense_params: float, dense_flops: float) -> dict[str, Any]:
    """The layer-table row (LayerInfo) of one layer whose only search parameter is its own theta."""
    return {
        "name": name,
        "type": type(module).__name__,
        "method": method,
        "shape": list(module.weight.shape),
        "params": [name],
        "costs": {"params": params, "flops": flops},
        "dense": {"params": float(dense_params), "flops": dense_flops},
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
            if self.traces[name].calls == 0:  # e.g. nn.MultiheadAttention's out_proj: its weight is read directly
                self.skipped[name] = "its forward never runs (its parent reads its weight directly); it cannot be replaced"
                continue
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
                "batch_traced": input_batch_size(example_input),
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

    #: The child of a factorized layer that least squares refits (its last factor), or None.
    ls_factor: ClassVar[str | None] = None
    #: Whether that correction is on when the job does not say (see docs/proxy.md).
    ls_default: ClassVar[bool] = False

    @property
    def ls_correction(self) -> bool:
        """Whether ``apply`` refits the last factor of each factorized layer by least squares."""
        if self.ls_factor is None:
            return False
        return bool(self.ls_default if self.options.ls_correction is None else self.options.ls_correction)

    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A deep copy of the model with every planned layer compressed at its theta (then refitted, if on)."""
        out = copy.deepcopy(self.model)
        self.apply_to(out, theta)
        run_ls_refit(out, self.ls_sites(theta), self)
        return out

    def ls_sites(self, theta: Mapping[str, float]) -> dict[str, Any]:
        """The last factors to refit at ``theta`` (name in the compressed model -> its Site); {} when off.

        The last factor (a 1x1 conv or a Linear, with the layer's bias) sees exactly the output
        positions of the original layer, so it is refitted to reproduce the original layer's
        output (sampled once per job on the calibration inputs) from what it now receives.
        """
        if not self.ls_correction:
            return {}
        changed = [n for n in self.changed_layers(theta)]
        if not changed:
            return {}
        if getattr(self, "_ls_cache", None) is None:
            from bocompress.worker.methods.lsq import sample_sites

            inputs = self.options.calib_inputs if self.options.calib_inputs is not None else self.example_input
            inputs = B.head(inputs, min(B.n_samples(inputs), 256))
            ok = [n for n in self.plans if self.traces[n].calls == 1]
            self._ls_cache = (inputs, sample_sites(self.model, ok, inputs, self.options.n_points, self.options.seed))
        _, sites = self._ls_cache
        return {f"{n}.{self.ls_factor}": sites[n] for n in changed if n in sites}

    def unrepaired_layers(self, theta: Mapping[str, float]) -> list[str]:
        """Changed layers whose output the least squares does not reconstruct."""
        fitted = {k.rsplit(".", 1)[0] for k in self.ls_sites(theta)}
        return [n for n in self.changed_layers(theta) if n not in fitted]

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


def run_ls_refit(module: nn.Module, sites: Mapping[str, Any], comp: Compressor) -> None:
    """Refit the given sites of ``module`` in one forward pass over the compressor's LS inputs."""
    if not sites:
        return
    from bocompress.worker.methods.lsq import refit_in_forward

    parts = getattr(comp, "parts", [comp])
    inputs = next(p._ls_cache[0] for p in parts if getattr(p, "_ls_cache", None) is not None)
    refit_in_forward(module, sites, inputs)


def dense_costs(module: nn.Module, trace: LayerTrace) -> tuple[int, int, float]:
    """``(weight numel, bias numel, flops per sample)`` of a dense Conv2d or Linear layer."""
    w = module.weight.numel()
    b = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    return int(w), int(b), 2.0 * trace.pos_out * w

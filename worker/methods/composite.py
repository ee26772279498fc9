"""Several layer-wise methods over disjoint layer types, as one compressor (``{"Conv2d": "tucker2", "Linear": "svd"}``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from bocompress.schemas import ProfileReport
from bocompress.worker.methods.base import CompressionError, Compressor
from bocompress.worker.methods.layerwise import LayerwiseCompressor, run_ls_refit

__all__ = ["CompositeCompressor"]


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

    def unrepaired_layers(self, theta: Mapping[str, float]) -> list[str]:
        """The layers any part changes without reconstructing their output."""
        return [n for part in self.parts for n in part.unrepaired_layers(theta)]

    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A deep copy of the model compressed by every part in turn, then refitted (parts with least squares on)."""
        out = copy.deepcopy(self.model)
        for part in self.parts:
            part.apply_to(out, theta)
        sites: dict[str, Any] = {}
        for part in self.parts:
            sites.update(part.ls_sites(theta))
        run_ls_refit(out, sites, self)
        return out

    @property
    def ls_correction(self) -> bool:
        """Whether any part refits by least squares."""
        return any(p.ls_correction for p in self.parts)

    def _params_adjust(self, module: nn.Module) -> int:
        return sum(p._params_adjust(module) for p in self.parts)

    def _flops_adjust(self, module: nn.Module) -> float:
        return sum(p._flops_adjust(module) for p in self.parts)

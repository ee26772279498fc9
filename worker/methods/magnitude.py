"""Unstructured magnitude pruning (Han et al. 2015): a per-layer density theta.

Each selected Conv2d / Linear layer keeps its ``kept(theta, numel)`` largest-|w| weights and zeroes
the rest (the module keeps its shape and stays a plain ``nn.Module``). The order of the weights by
decreasing magnitude is computed once (a stable sort, so ties go to the lower flat index and
exactly the asked count is kept).

Costs count what a sparse format would store and run: ``params`` = nonzero weights + bias
(:meth:`MagnitudeCompressor.count_params` counts nonzeros of the pruned weights), ``flops`` = the
dense FLOPs minus ``2 x positions`` for every zeroed weight. A weight that was already zero in
the original stays zero, so each form is capped at the original's nonzero count.
"""

from __future__ import annotations

import torch
from torch import nn

from bocompress.costs import kept
from bocompress.worker.methods.layerwise import LayerPlan, LayerwiseCompressor, dense_costs, form, layer_info
from bocompress.worker.methods.signals import importance_curves
from bocompress.worker.methods.tracing import LayerTrace

__all__ = ["MagnitudeCompressor"]


class MagnitudeCompressor(LayerwiseCompressor):
    """Per-layer magnitude pruning of Conv2d and Linear weights (weight masks, shapes unchanged)."""

    method = "magnitude"
    supported = ("Conv2d", "Linear")

    def plan_layer(self, name: str, module: nn.Module, trace: LayerTrace) -> LayerPlan | str:
        """Sort the layer's weights by decreasing magnitude once; cost forms in the kept count."""
        w = module.weight.detach()
        numel, b, flops_dense = dense_costs(module, trace)
        if numel < 2:
            return "a single weight cannot be pruned"
        order = torch.sort(w.abs().flatten(), descending=True, stable=True).indices
        if numel < 2**31:
            order = order.to(torch.int32)
        nnz = int(torch.count_nonzero(w))
        per_weight = 2.0 * trace.pos_out  # FLOPs per sample of one weight
        f = [(name, numel)]
        info = layer_info(name, module, self.method, form([(1, f), (b, [])], nnz + b),
                          form([(per_weight, f)], per_weight * nnz), numel + b, flops_dense)
        param = {"name": name, "low": self.theta_min, "high": 1.0, "size": numel, "dense_from": 1.0}
        return LayerPlan(name, info, param, {"order": order, "numel": numel, "per_weight": per_weight})

    def layer_changed(self, plan: LayerPlan, theta: float) -> bool:
        """Whether some weight is zeroed at ``theta``."""
        return kept(theta, plan.cache["numel"]) < plan.cache["numel"]

    def layer_curves(self, plan: LayerPlan, grid) -> tuple[list[float], list[float]]:
        """Squared-weight energy kept, and the LAMP score (Lee et al. 2021) of the largest weight pruned."""
        w = self.model.get_submodule(plan.name).weight.detach().flatten()
        v = w[plan.cache["order"].long().to(w.device)].to(torch.float64).pow(2)
        return importance_curves(v, [kept(t, plan.cache["numel"]) for t in grid])

    def density_mask(self, name: str, theta: float) -> torch.Tensor:
        """The boolean keep-mask (weight shape) of layer ``name`` at density ``theta``."""
        plan = self.plans[name]
        return self._mask(plan, theta).reshape(plan.info["shape"])

    @staticmethod
    def _mask(plan: LayerPlan, theta: float) -> torch.Tensor:
        c = plan.cache
        k = kept(theta, c["numel"])
        mask = torch.zeros(c["numel"], dtype=torch.bool, device=c["order"].device)
        mask[c["order"][:k].long()] = True
        return mask

    def compress_layer(self, plan: LayerPlan, module: nn.Module, theta: float) -> nn.Module | None:
        """Zero, in place, every weight outside the ``kept(theta, numel)`` largest by magnitude."""
        if kept(theta, plan.cache["numel"]) == plan.cache["numel"]:
            return None
        mask = self._mask(plan, theta).reshape(module.weight.shape)
        module.weight.mul_(mask.to(device=module.weight.device, dtype=module.weight.dtype))
        return None

    def _zeros(self, module: nn.Module) -> list[tuple[LayerPlan, int]]:
        out = []
        for name, plan in self.plans.items():
            try:
                layer = module.get_submodule(name)
            except AttributeError:
                continue
            w = getattr(layer, "weight", None)
            if w is None:
                continue
            out.append((plan, int(w.numel() - torch.count_nonzero(w))))
        return out

    def _params_adjust(self, module: nn.Module) -> int:
        """Minus the zero weights of the pruned layers (so count_params counts nonzeros)."""
        return -sum(z for _, z in self._zeros(module))

    def _flops_adjust(self, module: nn.Module) -> float:
        """Minus the FLOPs of the zero weights of the pruned layers."""
        return -sum(plan.cache["per_weight"] * z for plan, z in self._zeros(module))

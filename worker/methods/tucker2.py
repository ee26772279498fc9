"""Tucker-2 decomposition of convolutions (Kim et al. 2016), truncated per theta.

A kernel ``W`` (``c_out x c_in x kh x kw``) is decomposed on its output and input modes by HOSVD:
``W ~ C x_1 U_out x_2 U_in`` with ``U_out`` (``c_out x r_out``) and ``U_in`` (``c_in x r_in``)
the leading eigenvectors of the mode unfoldings' Gram matrices and the core
``C = W x_1 U_out^T x_2 U_in^T`` (``r_out x r_in x kh x kw``). The layer becomes

    1x1 conv (c_in -> r_in) -> kh x kw conv (r_in -> r_out, same stride/padding/dilation)
    -> 1x1 conv (r_out -> c_out, with the original bias),

with ``r_in = kept(theta, c_in)`` and ``r_out = kept(theta, c_out)`` (one theta per layer).
Because ``U_out`` and ``U_in`` are orthonormal, the core for any ranks is a slice of the full core,
computed once: a trial costs a slice and three small copies. Parameters
``c_in r_in + r_in r_out kh kw + r_out c_out + bias``. theta ranges over [theta_min, 1] ("leave it
dense"): the dense conv is kept wherever the block is not cheaper in the job's cost
(``options.cost_kind``, parameters by default), so the capped form of that cost is exact;
``dense_from`` is the break-even theta.
"""

from __future__ import annotations

import torch
from torch import nn

from bocompress.costs import kept
from bocompress.worker.methods.layerwise import LayerPlan, LayerwiseCompressor, dense_costs, form, layer_info
from bocompress.worker.methods.signals import break_even, importance_curves
from bocompress.worker.methods.tracing import LayerTrace

__all__ = ["Tucker2Compressor", "mode_basis"]


def mode_basis(unfolding: torch.Tensor) -> torch.Tensor:
    """A full orthonormal basis of the rows' space, leading directions first.

    Args:
        unfolding: ``c x rest`` mode unfolding (float64).

    Returns:
        ``c x c`` orthogonal matrix whose columns are the eigenvectors of ``unfolding @ unfolding.T``
        by decreasing eigenvalue (the left singular vectors, completed to a full basis when
        ``rest < c``).
    """
    evals, evecs = torch.linalg.eigh(unfolding @ unfolding.T)
    order = torch.argsort(evals, descending=True, stable=True)
    return evecs[:, order]


def _stride_first(module: nn.Conv2d) -> bool:
    """Whether the conv is 1x1 without padding, so its stride can be applied by the first factor."""
    return tuple(module.kernel_size) == (1, 1) and module.padding in ((0, 0), "valid", "same")


class Tucker2Compressor(LayerwiseCompressor):
    """Tucker-2 (HOSVD on the in and out channel modes) of groups=1 convolutions."""

    method = "tucker2"
    supported = ("Conv2d",)
    ls_factor = "2"
    ls_default = True  # measured: docs/proxy.md

    def plan_layer(self, name: str, module: nn.Module, trace: LayerTrace) -> LayerPlan | str:
        """Cache the full factors and core of one conv, and its cost forms."""
        if module.groups != 1:
            return f"tucker2 takes groups=1 convolutions only (groups={module.groups})"
        c_out, c_in, kh, kw = (int(s) for s in module.weight.shape)
        k2 = kh * kw
        w_numel, b, flops_dense = dense_costs(module, trace)
        # A 1x1 unpadded conv subsamples then mixes channels: its stride moves to the first
        # factor, which then runs at the output resolution like the other two.
        p_in = trace.pos_out if _stride_first(module) else trace.pos_in
        p_out = trace.pos_out

        def cost(r: tuple[int, ...]) -> tuple[float, float]:
            ri, ro = r
            params = c_in * ri + ri * ro * k2 + ro * c_out + b
            flops = 2.0 * p_in * c_in * ri + 2.0 * p_out * (ri * ro * k2 + ro * c_out)
            return params, flops

        search = break_even([c_in, c_out], cost, (w_numel + b, flops_dense), self.theta_min, self.options.cost_kind)
        if isinstance(search, str):
            return search
        dense_from, exact = search
        w64 = module.weight.detach().to(torch.float64)
        u_out = mode_basis(w64.reshape(c_out, -1))  # c_out x c_out
        u_in = mode_basis(w64.transpose(0, 1).reshape(c_in, -1))  # c_in x c_in
        core = torch.einsum("oihw,oa,ib->abhw", w64, u_out, u_in)  # c_out x c_in x kh x kw
        dtype = module.weight.dtype
        fi, fo = (name, c_in), (name, c_out)
        info = layer_info(
            name, module, self.method,
            form([(c_in, [fi]), (k2, [fi, fo]), (c_out, [fo]), (b, [])], w_numel + b),
            form([(2.0 * p_in * c_in, [fi]), (2.0 * p_out * k2, [fi, fo]), (2.0 * p_out * c_out, [fo])], flops_dense),
            w_numel + b, flops_dense,
        )
        param = {"name": name, "low": self.theta_min, "high": 1.0, "size": max(c_in, c_out), "dense_from": dense_from}
        cache = {
            "cost": cost,
            "dense": (w_numel + b, flops_dense),
            "rule": 1 if self.options.cost_kind == "flops" else 0,
            "exact": exact,
            # energy of each out / in direction (rows / columns of the core: the mode eigenvalues)
            "e_out": core.pow(2).sum(dim=(1, 2, 3)),
            "e_in": core.pow(2).sum(dim=(0, 2, 3)),
            "e_core": core.pow(2).sum(dim=(2, 3)),
            "u_out": u_out.to(dtype),
            "u_in": u_in.to(dtype),
            "core": core.to(dtype),
            "c_in": c_in,
            "c_out": c_out,
            "k2": k2,
            "bias": b,
        }
        return LayerPlan(name, info, param, cache)

    def ranks(self, name: str, theta: float) -> tuple[int, int]:
        """``(r_in, r_out)`` used for layer ``name`` at ``theta``."""
        c = self.plans[name].cache
        return kept(theta, c["c_in"]), kept(theta, c["c_out"])

    def compress_layer(self, plan: LayerPlan, module: nn.Module, theta: float) -> nn.Module | None:
        """The three-conv Tucker-2 block, or ``None`` when it is not cheaper than the dense conv."""
        c = plan.cache
        ri, ro = kept(theta, c["c_in"]), kept(theta, c["c_out"])
        if not self._cheap(c, ri, ro):
            return None
        return self._build(plan, module, ri, ro)

    @staticmethod
    def _cheap(c: dict, ri: int, ro: int) -> bool:
        return c["cost"]((ri, ro))[c["rule"]] < c["dense"][c["rule"]]

    def layer_changed(self, plan: LayerPlan, theta: float) -> bool:
        """Whether the conv is decomposed at ``theta`` (cheaper than dense in the job's cost)."""
        c = plan.cache
        return self._cheap(c, kept(theta, c["c_in"]), kept(theta, c["c_out"]))

    def layer_curves(self, plan: LayerPlan, grid) -> tuple[list[float], list[float]]:
        """Core energy kept ``|core[:r_out, :r_in]|^2 / |W|^2``; LAMP score of the first mode direction dropped.

        The LAMP score is the larger of the two modes' scores (each mode's directions ranked by
        their energy); 0 where the conv is left dense.
        """
        c = plan.cache
        total = float(c["e_core"].sum())
        energy, lamp = [], []
        full_in, full_out = c["c_in"], c["c_out"]
        for t in grid:
            ri, ro = kept(t, full_in), kept(t, full_out)
            if not self._cheap(c, ri, ro):
                ri, ro = full_in, full_out
            energy.append(float(c["e_core"][:ro, :ri].sum()) / total if total > 0 and (ri, ro) != (full_in, full_out) else 1.0)
            s_out = importance_curves(c["e_out"], [ro])[1][0]
            s_in = importance_curves(c["e_in"], [ri])[1][0]
            lamp.append(max(s_out, s_in))
        for i in range(1, len(energy)):
            energy[i] = max(energy[i], energy[i - 1])
            lamp[i] = min(lamp[i], lamp[i - 1])
        return energy, lamp

    def factorize(self, name: str, r_in: int, r_out: int) -> nn.Module:
        """The Tucker-2 block of layer ``name`` of the original model at the given ranks, cheaper or not."""
        plan = self.plans[name]
        c = plan.cache
        if not (1 <= r_in <= c["c_in"] and 1 <= r_out <= c["c_out"]):
            raise ValueError(f"ranks must be in [1, {c['c_in']}] x [1, {c['c_out']}], got ({r_in}, {r_out})")
        with torch.no_grad():
            return self._build(plan, self.model.get_submodule(name), r_in, r_out)

    @staticmethod
    def _build(plan: LayerPlan, module: nn.Conv2d, ri: int, ro: int) -> nn.Module:
        c = plan.cache
        dev, dtype = module.weight.device, c["core"].dtype
        early = _stride_first(module)
        first = nn.Conv2d(c["c_in"], ri, 1, stride=module.stride if early else 1, bias=False, device=dev, dtype=dtype)
        middle = nn.Conv2d(
            ri, ro, module.kernel_size, stride=1 if early else module.stride, padding=module.padding,
            dilation=module.dilation, bias=False, padding_mode=module.padding_mode, device=dev, dtype=dtype,
        )
        last = nn.Conv2d(ro, c["c_out"], 1, bias=module.bias is not None, device=dev, dtype=dtype)
        # copy_ moves the cached factors to the layer's device if the model moved since they were made
        first.weight.copy_(c["u_in"][:, :ri].T.reshape(ri, c["c_in"], 1, 1))
        middle.weight.copy_(c["core"][:ro, :ri])
        last.weight.copy_(c["u_out"][:, :ro].reshape(c["c_out"], ro, 1, 1))
        if module.bias is not None:
            last.bias.copy_(module.bias.detach())
        return nn.Sequential(first, middle, last)

"""Low-rank factorization by truncated SVD: Linear layers and 1x1 convolutions.

A weight ``W`` (``n x m``: out x in) becomes two layers of rank ``r = kept(theta, min(n, m))``:
``x -> B x`` (``r x m``, no bias) then ``-> A (B x) + bias`` (``n x r``), with ``A B`` the best
rank-``r`` approximation of ``W`` (Eckart-Young): ``A = U_r D_r``, ``B = D_r^-1 U_r^T W`` where
``U`` holds the left singular vectors and ``D = sqrt(S)`` balances the two factors (1 for null
directions, so the product stays exact). Parameters ``r (m + n) + bias``. theta ranges over
[theta_min, 1] ("leave it dense"): the dense layer is kept wherever the factorization is not
cheaper in the job's cost (``options.cost_kind``; parameters by default), so the cap of the cost
form (the dense cost) is exact, and ``dense_from`` is the break-even theta.

The singular vectors come once per layer from the eigendecomposition (float64) of the smaller
Gram matrix (``W W^T`` or ``W^T W``): an order of magnitude faster than a LAPACK SVD on CPU for
the wide matrices of conv/FC layers, and exact at full rank since the basis is orthonormal.
"""

from __future__ import annotations

import torch
from torch import nn

from bocompress.costs import kept
from bocompress.worker.methods.layerwise import LayerPlan, LayerwiseCompressor, dense_costs, form, layer_info
from bocompress.worker.methods.signals import break_even, importance_curves
from bocompress.worker.methods.tracing import LayerTrace

__all__ = ["SVDCompressor"]


def _reshape_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an ``out x in`` matrix (a 1x1 conv's kernel dims dropped)."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], w.shape[1])


def svd_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of ``w`` whose leading ``r`` columns/rows give its best rank-``r`` approximation.

    Args:
        w: ``n x m`` matrix (float64).

    Returns:
        ``(A, B)``, ``A``: ``n x k``, ``B``: ``k x m`` with ``k = min(n, m)``, singular directions by
        decreasing singular value, ``A[:, :r] @ B[:r]`` the truncated SVD of ``w`` (exact at ``r = k``).
    """
    n, m = w.shape
    if n <= m:
        evals, u = torch.linalg.eigh(w @ w.T)
        order = torch.argsort(evals, descending=True, stable=True)
        u, s = u[:, order], evals[order].clamp_min(0).sqrt()
        d = torch.where(s > s.max() * 1e-12, s.sqrt(), torch.ones_like(s))
        return u * d, (u.T @ w) / d[:, None]
    b_t, a_t = svd_factors(w.T)  # w.T = b_t a_t  =>  w = a_t.T b_t.T
    return a_t.T, b_t.T


class SVDCompressor(LayerwiseCompressor):
    """Truncated SVD of Linear layers and 1x1 (groups=1) convolutions; one rank fraction per layer."""

    method = "svd"
    supported = ("Linear", "Conv2d")
    ls_factor = "1"
    ls_default = True  # measured: docs/proxy.md

    def plan_layer(self, name: str, module: nn.Module, trace: LayerTrace) -> LayerPlan | str:
        """Cache ``A = U sqrt(S)`` and ``B = sqrt(S) V^T`` at full rank, and the layer's cost forms."""
        if isinstance(module, nn.Conv2d):
            if module.kernel_size != (1, 1):
                return f"svd takes 1x1 convolutions only (kernel {tuple(module.kernel_size)}); use tucker2"
            if module.groups != 1:
                return f"svd takes groups=1 convolutions only (groups={module.groups})"
        n, m = int(module.weight.shape[0]), int(module.weight.shape[1])
        size = min(n, m)
        w_numel, b, flops_dense = dense_costs(module, trace)
        p = trace.pos_out

        def cost(r: tuple[int, ...]) -> tuple[float, float]:
            return r[0] * (m + n) + b, 2.0 * p * r[0] * (m + n)

        rule = 1 if self.options.cost_kind == "flops" else 0
        search = break_even([size], cost, (w_numel + b, flops_dense), self.theta_min, self.options.cost_kind)
        if isinstance(search, str):
            return search
        dense_from, _exact = search
        a, bmat = svd_factors(_reshape_weight(module).to(torch.float64))
        # sigma_i = |A_i| |B_i| for the balanced factors (A_i = u_i d_i, B_i = u_i' W / d_i)
        sigma2 = (a.norm(dim=0) * bmat.norm(dim=1)).pow(2)
        dtype = module.weight.dtype
        a, bmat = a.to(dtype), bmat.to(dtype)  # n x size, size x m
        f = [(name, size)]
        info = layer_info(name, module, self.method, form([(m + n, f), (b, [])], w_numel + b),
                          form([(2.0 * p * (m + n), f)], flops_dense), w_numel + b, flops_dense)
        param = {"name": name, "low": self.theta_min, "high": 1.0, "size": size, "dense_from": dense_from}
        cache = {"a": a, "b": bmat, "size": size, "n": n, "m": m, "bias": b, "sigma2": sigma2,
                 "cost": cost, "dense": (w_numel + b, flops_dense), "rule": rule}
        return LayerPlan(name, info, param, cache)

    @staticmethod
    def _cheap(c: dict, r: int) -> bool:
        return c["cost"]((r,))[c["rule"]] < c["dense"][c["rule"]]

    def layer_changed(self, plan: LayerPlan, theta: float) -> bool:
        """Whether the layer is factorized at ``theta`` (cheaper than dense in the job's cost)."""
        return self._cheap(plan.cache, kept(theta, plan.cache["size"]))

    def layer_curves(self, plan: LayerPlan, grid) -> tuple[list[float], list[float]]:
        """Singular-value energy kept, and the LAMP score of the first singular value dropped."""
        c = plan.cache
        counts = []
        for t in grid:
            r = kept(t, c["size"])
            counts.append(r if self._cheap(c, r) else c["size"])
        return importance_curves(c["sigma2"], counts)

    def rank(self, name: str, theta: float) -> int:
        """The rank used for layer ``name`` at ``theta``."""
        return kept(theta, self.plans[name].cache["size"])

    def compress_layer(self, plan: LayerPlan, module: nn.Module, theta: float) -> nn.Module | None:
        """Two layers of rank ``kept(theta, min(n, m))``, or ``None`` (dense) where that is not cheaper."""
        c = plan.cache
        r = kept(theta, c["size"])
        if not self._cheap(c, r):
            return None
        return self._build(plan, module, r)

    def factorize(self, name: str, rank: int) -> nn.Module:
        """The rank-``rank`` factorization of layer ``name`` of the original model, cheaper or not."""
        plan = self.plans[name]
        if not 1 <= rank <= plan.cache["size"]:
            raise ValueError(f"rank must be in [1, {plan.cache['size']}], got {rank}")
        with torch.no_grad():
            return self._build(plan, self.model.get_submodule(name), rank)

    @staticmethod
    def _build(plan: LayerPlan, module: nn.Module, r: int) -> nn.Module:
        c = plan.cache
        n, m = c["n"], c["m"]
        dev = module.weight.device  # the caches follow the model if it moved since the compressor was built
        a, bmat = c["a"][:, :r].to(dev).contiguous(), c["b"][:r].to(dev).contiguous()
        has_bias = module.bias is not None
        if isinstance(module, nn.Conv2d):
            first = nn.Conv2d(
                m, r, 1, stride=module.stride, padding=module.padding, dilation=module.dilation,
                bias=False, padding_mode=module.padding_mode, device=dev, dtype=a.dtype,
            )
            second = nn.Conv2d(r, n, 1, bias=has_bias, device=dev, dtype=a.dtype)
            first.weight.copy_(bmat.reshape(r, m, 1, 1))
            second.weight.copy_(a.reshape(n, r, 1, 1))
        else:
            first = nn.Linear(m, r, bias=False, device=dev, dtype=a.dtype)
            second = nn.Linear(r, n, bias=has_bias, device=dev, dtype=a.dtype)
            first.weight.copy_(bmat)
            second.weight.copy_(a)
        if has_bias:
            second.bias.copy_(module.bias.detach())
        return nn.Sequential(first, second)

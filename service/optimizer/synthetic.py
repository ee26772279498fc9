"""Synthetic compression landscapes, for the engine's tests and benchmarks.

A fake model of ``d`` linear layers compressed by SVD: layer ``l`` (``m_l x n_l``) kept at rank
``k_l = kept(theta_l, min(m_l, n_l))`` costs ``k_l * (m_l + n_l)`` parameters, capped at the dense
``m_l * n_l``; ``theta_l`` ranges over ``[theta_min, break-even]``. The distillation error is
near-additive over layers, as measured on real networks:

    L(theta) = sum_l a_l (1 - theta_l)^p_l + b * (sum_l c_l (1 - theta_l))^2,

reported with a multiplicative noise of relative standard error ``noise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bocompress.costs import kept


@dataclass(frozen=True)
class Landscape:
    """A synthetic compression problem.

    Attributes:
        profile: A ProfileReport dict (layers with ``params`` cost forms, SearchParams, totals).
        params: The SearchParam dicts (``profile["params"]``).
        a: Per-layer error weights.
        p: Per-layer error exponents.
        c: Per-layer interaction weights.
        b: The interaction strength.
        noise: Relative standard error of a reported L.
    """

    profile: dict
    params: list[dict]
    a: list[float]
    p: list[float]
    c: list[float]
    b: float
    noise: float

    def true_l(self, theta: dict[str, float]) -> float:
        """The noiseless L at ``theta`` (theta taken at its kept counts, as a worker would)."""
        fr = []
        for sp in self.params:
            size = int(sp["size"])
            fr.append(kept(float(theta[sp["name"]]), size) / size)
        add = sum(a * (1.0 - f) ** p for a, p, f in zip(self.a, self.p, fr))
        inter = sum(c * (1.0 - f) for c, f in zip(self.c, fr))
        return add + self.b * inter**2

    def measure(self, theta: dict[str, float], g: torch.Generator) -> tuple[float, float]:
        """A noisy L and its standard error."""
        L = self.true_l(theta)
        eps = float(torch.randn(1, generator=g, dtype=torch.float64))
        return max(L * (1.0 + self.noise * eps), 1e-12), self.noise * L


def make_landscape(d: int = 8, seed: int = 0, theta_min: float = 0.05, noise: float = 0.05) -> Landscape:
    """A random ``d``-layer landscape (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=torch.float64))

    layers, params = [], []
    total = 0.0
    a, p, c = [], [], []
    for i in range(d):
        m, n = int(u(32, 512)), int(u(32, 512))
        size = min(m, n)
        dense = float(m * n)
        total += dense
        name = f"layer{i}"
        break_even = min(1.0, dense / ((m + n) * size))
        layers.append(
            {
                "name": name,
                "type": "Linear",
                "method": "svd",
                "shape": [m, n],
                "params": [name],
                "costs": {"params": {"terms": [{"coef": float(m + n), "factors": [{"param": name, "size": size}]}], "cap": dense}},
                "dense": {"params": dense},
            }
        )
        params.append({"name": name, "low": theta_min, "high": max(theta_min, math.floor(break_even * size) / size), "size": size})
        a.append(u(0.02, 0.3) * 8.0 / d)
        p.append(u(1.5, 4.0))
        c.append(u(0.0, 0.1) * 8.0 / d)
    profile = {"layers": layers, "params": params, "totals": {"params": total * 1.05}, "model_info": {}}
    return Landscape(profile=profile, params=params, a=a, p=p, c=c, b=0.5, noise=noise)


def sobol_history(ls: Landscape, n: int, design_seed: int = 3, noise_seed: int = 0) -> list:
    """``n`` observations of ``ls`` at the points of a scrambled Sobol design (seeded), measured
    with seeded noise: a history to time or test the GP stage on."""
    from .problem import Observation
    from .sobol import sobol_points
    from .space import Space

    sp = Space(ls.params, compression=True)
    g = torch.Generator().manual_seed(noise_seed)
    d = len(ls.params)
    points = [sp.from_unit(u) for u in sobol_points(d, design_seed, 0, n).tolist()]
    return [Observation(p, *ls.measure(p, g)) for p in points]

"""Candidates for the acquisition optimizer: raw starting clouds, the choice of starts, the
re-ranking at the proposed (repaired, snapped) point, and the TuRBO-style trust region."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .acquisition import eval_acqf
from .problem import Compiled
from .sobol import sobol_points


def raw_candidates(ctx: Compiled, X: Tensor, J: Tensor, n_raw: int, g: torch.Generator) -> Tensor:
    """Candidate starting points: a Sobol cloud and (``local_frac`` of them) perturbations of the best points.

    The perturbations change a random subset of about 20 coordinates (as TuRBO's), which is what
    finds improvements in dozens of dimensions where a uniform cloud is nearly always far away.
    """
    d = ctx.space.d
    n_sobol = n_raw - int(round(n_raw * ctx.local_frac))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    cloud = sobol_points(d, seed, 0, n_sobol)
    k = min(5, X.shape[0])
    best = X[torch.argsort(J, stable=True)[:k]]
    n_loc = n_raw - n_sobol
    centres = best[torch.arange(n_loc) % k]
    prob = min(1.0, 20.0 / d)
    mask = torch.rand(n_loc, d, generator=g, dtype=X.dtype) < prob
    none = ~mask.any(dim=-1)
    mask[none, torch.randint(0, d, (int(none.sum()),), generator=g)] = True
    scale = torch.tensor([0.02, 0.05, 0.1, 0.2], dtype=X.dtype)[torch.arange(n_loc) % 4].unsqueeze(-1)
    local = (centres + mask * scale * torch.randn(n_loc, d, generator=g, dtype=X.dtype)).clamp(0.0, 1.0)
    return ctx.repair(torch.cat([cloud, local]))


def boltzmann_pick(vals: Tensor, k: int, g: torch.Generator, eta: float = 1.0) -> Tensor:
    """The best candidate plus ``k - 1`` drawn with weights ``exp(eta * z)`` (BoTorch's initializer)."""
    fin = torch.isfinite(vals)
    v = torch.where(fin, vals, vals[fin].min() if bool(fin.any()) else torch.zeros_like(vals))
    z = (v - v.mean()) / (v.std() + 1e-12)
    w = torch.exp(eta * (z - z.max()))
    best = int(torch.argmax(v))
    w[best] = 0.0
    k = min(k, vals.numel())
    if k <= 1 or float(w.sum()) <= 0:
        return torch.tensor([best])
    rest = torch.multinomial(w, min(k - 1, int((w > 0).sum())), replacement=False, generator=g)
    return torch.cat([torch.tensor([best]), rest])


def rank_proposed(ctx: Compiled, acqf: Any, ranked: Tensor, head: int = 64) -> Tensor:
    """Re-rank the best candidates by the acquisition value of the point actually proposed.

    A candidate is proposed after the repair (constrained jobs) and the snapping to the space's
    grid, which can move it far (a rank of 6 of 32 is a coarse step): its acquisition value there,
    not at the continuous optimum, is what decides. The first ``head`` rows are repaired, snapped
    and re-scored; the rest keep their order behind them.

    Args:
        ctx: The compiled problem.
        acqf: The acquisition function.
        ranked: ``m x d`` candidates, best first by their continuous acquisition value.
        head: How many to re-score.

    Returns:
        ``m x d`` unit coordinates: the re-scored head (snapped, best first), then the rest.
    """
    top = ctx.repair(ranked[:head].clamp(0.0, 1.0))
    snapped = torch.tensor([ctx.space.snap(row) for row in top.tolist()], dtype=ranked.dtype)
    vals = eval_acqf(acqf, snapped)
    order = torch.argsort(vals, descending=True, stable=True)
    return torch.cat([snapped[order], ranked[head:]])


# TuRBO-style trust region (Eriksson et al. 2019), sized for budgets of tens of trials: the box
# side in unit coordinates starts at TR_INIT, doubles after TR_SUCC improvements in a row (up to
# TR_MAX), halves after TR_FAIL trials without one (down to TR_MIN, then restarts at TR_INIT).
TR_INIT, TR_MIN, TR_MAX = 0.4, 0.02, 1.6
TR_SUCC, TR_FAIL = 2, 3


def update_trust_region(ctx: Compiled, J: Tensor, tr: dict | None) -> dict:
    """Update the trust region's state from the observations since the last call (``J`` in trial order)."""
    tr = dict(tr or {"length": TR_INIT, "succ": 0, "fail": 0, "seen": 0, "best": None})
    seen = int(tr.get("seen", 0))
    best = tr.get("best")
    if best is None and seen == 0:
        # The first GP call: the initial design sets the incumbent.
        tr["best"] = float(J.min()) if J.numel() else None
        tr["seen"] = int(J.numel())
        return tr
    for v in J[seen:].tolist():
        if best is None or v < best - 1e-3 * abs(best):
            tr["succ"], tr["fail"], best = tr["succ"] + 1, 0, v
        else:
            tr["succ"], tr["fail"] = 0, tr["fail"] + 1
        if tr["succ"] >= TR_SUCC:
            tr["length"], tr["succ"] = min(TR_MAX, 2.0 * tr["length"]), 0
        elif tr["fail"] >= TR_FAIL:
            tr["length"], tr["fail"] = tr["length"] / 2.0, 0
            if tr["length"] < TR_MIN:
                tr["length"] = TR_INIT
    tr["best"], tr["seen"] = best, int(J.numel())
    return tr


def tr_box(X: Tensor, J: Tensor, length: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(centre, lower, upper)`` of the trust region around the best observation (unit coordinates)."""
    centre = X[int(torch.argmin(J))]
    lo = (centre - length / 2).clamp(0.0, 1.0)
    hi = (centre + length / 2).clamp(0.0, 1.0)
    return centre, lo, hi


def tr_candidates(ctx: Compiled, centre: Tensor, lo: Tensor, hi: Tensor, n: int, g: torch.Generator) -> Tensor:
    """TuRBO's candidates: Sobol points in the box, each moving only a random ~20-coordinate subset."""
    d = ctx.space.d
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    pert = lo + (hi - lo) * sobol_points(d, seed, 0, n)
    prob = min(1.0, 20.0 / d)
    mask = torch.rand(n, d, generator=g, dtype=centre.dtype) < prob
    none = ~mask.any(dim=-1)
    mask[none, torch.randint(0, d, (int(none.sum()),), generator=g)] = True
    return ctx.repair(torch.where(mask, pert, centre.expand(n, d)))

"""The initial design: which trials belong to it, and their points (allocators, Sobol, perturbations).

Every function here returns unit coordinates already snapped to the space, never one in ``seen``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .allocators import ALLOCATORS
from .problem import Compiled, Observation, Problem, alloc_points
from .sobol import sobol_points


def n_initial_design(problem: Problem) -> int:
    if problem.engine == "auto" and (problem.objective or {}).get("kind") is not None:
        return max(problem.n_initial, len(alloc_points(problem)))
    return problem.n_initial


def in_initial_design(problem: Problem, index: int) -> bool:
    if problem.engine in ALLOCATORS:
        return True
    return problem.engine == "sobol" or (problem.engine == "auto" and index < n_initial_design(problem))


def initial_slot(ctx: Compiled, index: int, seen: set[tuple[int, ...]], mix: int,
                  obs: list[Observation]) -> list[float] | None:
    """A compression job's initial-design point other than Sobol's, or None to take Sobol's.

    Trials ``0 .. len(alloc) - 1`` take the allocators' points (unless already seen). Later
    initial trials take Sobol points, or with ``init="perturb"`` perturbations of the allocators'
    points (a random ~20-coordinate subset moved, as the GP stage's local candidates), which stay
    near the informative region a Sobol design in 20+ dimensions misses.
    """
    alloc = ctx.alloc or []
    if index < len(alloc):
        u = accept(ctx, torch.tensor([ctx.space.to_unit(alloc[index])], dtype=torch.float64), seen)
        if u is not None:
            return u
        return None
    if ctx.init != "perturb" or not alloc:
        return None
    d = ctx.space.d
    g = torch.Generator().manual_seed((mix + 7717 * index) % (2**31 - 1))
    base = torch.tensor([ctx.space.to_unit(p) for p in alloc], dtype=torch.float64)
    for _ in range(8):
        centres = base[torch.randint(0, base.shape[0], (16,), generator=g)]
        prob = min(1.0, 20.0 / d)
        mask = torch.rand(16, d, generator=g, dtype=torch.float64) < prob
        scale = torch.tensor([0.05, 0.1, 0.2, 0.3], dtype=torch.float64)[torch.arange(16) % 4].unsqueeze(-1)
        U = (centres + mask * scale * torch.randn(16, d, generator=g, dtype=torch.float64)).clamp(0.0, 1.0)
        u = accept(ctx, U, seen)
        if u is not None:
            return u
    return None


def ensure_feasible(ctx: Compiled, p: dict[str, float]) -> dict[str, float]:
    """The final guard: the reference R of a proposed point must fit the budget."""
    assert ctx.budget is not None
    if ctx.exact_r(p) <= ctx.budget:
        return p
    # Float summation order put a boundary point a hair over: step grid dims down one at a time.
    u = torch.tensor([ctx.space.to_unit(p)], dtype=torch.float64)
    for scale in (0.999, 0.99, 0.95, 0.9, 0.75, 0.5, 0.25, 0.0):
        q = ctx.space.from_unit((u[0] * scale).tolist())
        if ctx.exact_r(q) <= ctx.budget or scale == 0.0:
            return q
    return ctx.space.from_unit([0.0] * ctx.space.d)


def accept(ctx: Compiled, U: Tensor, seen: set[tuple[int, ...]]) -> list[float] | None:
    """The first row of ``U`` (unit coordinates, repaired if constrained) not yet seen, snapped."""
    U = ctx.repair(U.clamp(0.0, 1.0))
    for row in U.tolist():
        u = ctx.space.snap(row)
        if ctx.space.unit_key(u) not in seen:
            return u
    return None


def sobol_slot(ctx: Compiled, index: int, seen: set[tuple[int, ...]], mix: int,
                point: Tensor | None = None) -> list[float] | None:
    """Sobol point ``index`` (``point``, when the caller drew it already) mapped to the space;
    seeded uniform draws when it is taken."""
    d = ctx.space.d
    if index == 0 and ctx.center:
        u = accept(ctx, torch.full((1, d), 0.5, dtype=torch.float64), seen)
        if u is not None:
            return u
    u = accept(ctx, sobol_points(d, ctx.problem.seed, index, 1) if point is None else point, seen)
    if u is not None:
        return u
    g = torch.Generator().manual_seed((mix + 31 * index) % (2**31 - 1))
    for _ in range(8):
        u = accept(ctx, torch.rand(64, d, generator=g, dtype=torch.float64), seen)
        if u is not None:
            return u
    return None

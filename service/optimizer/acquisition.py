"""The GP stage's training data and acquisition functions (see :mod:`bocompress.service.optimizer.engine`).

:func:`training_data` turns observations into the modelled outcome and each point's job objective;
:func:`build_acqf` builds the log-EI-family acquisition of the job's objective kind.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
from botorch.acquisition.objective import GenericMCObjective
from botorch.sampling.normal import SobolQMCNormalSampler
from torch import Tensor

from bocompress.objective import job_objective

from . import transforms
from .gp import MIN_YVAR
from .problem import MIN_L, Compiled, Observation


def training_data(ctx: Compiled, obs: list[Observation]) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Unit inputs, modelled outcome, its noise variance, and each point's job objective.

    Returns:
        ``X`` (``n x d``), ``Y`` (``n x 1``: log L, or the metric signed so larger is better),
        ``Yvar`` (``n x 1`` or None when some sem is unknown), and ``J`` (``n``: the job
        objective, lower is better, used to rank incumbents and choose subsets).
    """
    X = torch.tensor([ctx.space.snap(ctx.space.to_unit(o.params)) for o in obs], dtype=torch.float64)
    vals = torch.tensor([float(o.value) for o in obs], dtype=torch.float64)
    have_sem = all(o.sem is not None and math.isfinite(float(o.sem)) for o in obs)
    sem = torch.tensor([float(o.sem) if have_sem else 0.0 for o in obs], dtype=torch.float64)  # type: ignore[arg-type]
    if ctx.compression:
        L = vals.clamp_min(MIN_L)
        Y = L.log()
        var = (sem / L) ** 2  # delta method: var(log L) ~ (sem / L)^2
        theta = ctx.space.snap_theta_tensor(X)
        assert ctx.cost is not None
        R = ctx.cost(theta, exact=True)
        J = job_objective(ctx.kind, vals, R, ctx.kappa, ctx.budget)
    else:
        Y = vals if ctx.maximize else -vals
        var = sem**2
        J = -Y
        # A monotone transform chosen from the data (``none`` unless the bad tail is heavy):
        # the order of the points, and so J and the incumbent, are unchanged.
        name = transforms.choose(Y, ctx.transform)
        Y, slope = transforms.apply(name, Y)
        if slope is None:
            have_sem = False  # rank scores: no derivative to carry the noise through; infer it
        else:
            var = var * slope**2
        if ctx.winsorize and Y.numel() >= 4:
            Y = winsorize_low(Y)
    Yvar = None
    if have_sem:
        floor = max(MIN_YVAR * float(Y.var()) if Y.numel() > 1 else MIN_YVAR, 1e-10)
        Yvar = var.clamp_min(floor).unsqueeze(-1)
    return X, Y.unsqueeze(-1), Yvar, J


def winsorize_low(Y: Tensor) -> Tensor:
    """Clip values below the lower Tukey fence ``q1 - 1.5 IQR`` (Y is larger-is-better)."""
    ys = torch.sort(Y).values
    n = ys.numel()
    q1 = ys[int(math.floor(0.25 * (n - 1)))]
    q3 = ys[int(math.ceil(0.75 * (n - 1)))]
    return Y.clamp_min(float(q1 - 1.5 * (q3 - q1)))


def fit_subset(ctx: Compiled, J: Tensor, mix: int) -> Tensor:
    """Indices to fit on: all when few; else the best third plus a seeded random rest."""
    n = J.shape[0]
    if n <= ctx.max_fit:
        return torch.arange(n)
    n_best = ctx.max_fit // 3
    order = torch.argsort(J, stable=True)
    best = order[:n_best]
    rest = order[n_best:]
    g = torch.Generator().manual_seed(mix)
    pick = rest[torch.randperm(rest.shape[0], generator=g)[: ctx.max_fit - n_best]]
    return torch.sort(torch.cat([best, pick])).values


def build_acqf(ctx: Compiled, model: Any, X: Tensor, Y: Tensor, X_pending: Tensor | None, mc: int, seed: int) -> Any:
    """The acquisition function of the job's objective (see :mod:`bocompress.service.optimizer.engine`)."""
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([mc]), seed=seed)
    space = ctx.space
    if ctx.kind is None:
        return qLogNoisyExpectedImprovement(
            model, X_baseline=X, sampler=sampler, X_pending=X_pending, prune_baseline=True, cache_root=False
        )
    cost = ctx.cost
    assert cost is not None

    def rel_r(Xq: Tensor) -> Tensor:
        return cost(space.theta_from_unit(Xq), exact=False)

    if ctx.kind == "scalarized":
        kappa = ctx.kappa

        def obj(samples: Tensor, X: Tensor | None = None) -> Tensor:
            assert X is not None
            return -(kappa * samples[..., 0].exp() + rel_r(X))

        return qLogNoisyExpectedImprovement(
            model, X_baseline=X, sampler=sampler, objective=GenericMCObjective(obj), X_pending=X_pending,
            prune_baseline=True, cache_root=False,
        )
    if ctx.kind == "constrained":
        budget = ctx.budget
        assert budget is not None
        # Over budget costs 50 nats of log L per unit of R overshoot: far worse than any feasible point.
        penalty = 50.0 / budget

        def cobj(samples: Tensor, X: Tensor | None = None) -> Tensor:
            assert X is not None
            return -samples[..., 0] - penalty * torch.relu(rel_r(X) - budget)

        return qLogNoisyExpectedImprovement(
            model, X_baseline=X, sampler=sampler, objective=GenericMCObjective(cobj), X_pending=X_pending,
            prune_baseline=True, cache_root=False,
        )
    # pareto: maximize (-log L, -R) with R deterministic.
    def mobj(samples: Tensor, X: Tensor | None = None) -> Tensor:
        assert X is not None
        r = rel_r(X).expand(samples.shape[:-1])
        return torch.stack([-samples[..., 0], -r], dim=-1)

    logl = Y[:, 0]
    r_obs = cost(space.snap_theta_tensor(X), exact=True)
    # The baseline is the observed near-front only: the hypervolume box decompositions per MC
    # sample grow with the baseline, and dominated points far from the front contribute nothing.
    keep = front_layers(torch.stack([logl, r_obs], dim=-1), min_points=10, max_points=30)
    span_l = float(logl.max() - logl.min()) + 1e-3
    span_r = float(r_obs.max() - r_obs.min()) + 1e-3
    ref = torch.tensor([-(float(logl.max()) + 0.1 * span_l), -(float(r_obs.max()) + 0.1 * span_r)], dtype=X.dtype)
    return qLogNoisyExpectedHypervolumeImprovement(
        model, ref_point=ref, X_baseline=X[keep], sampler=sampler, objective=GenericMCMultiOutputObjective(mobj),
        X_pending=X_pending, prune_baseline=False, cache_root=False,
    )


def front_layers(F: Tensor, min_points: int, max_points: int) -> Tensor:
    """Indices of the first non-dominated layers of ``n x 2`` costs (lower is better).

    Layers are peeled until at least ``min_points`` are taken (at most ``max_points``, a layer's
    points ordered by their first cost).
    """
    remaining = torch.arange(F.shape[0])
    taken: list[Tensor] = []
    count = 0
    while remaining.numel() > 0 and count < min_points:
        G = F[remaining]
        # i is dominated when some j is <= in both costs and < in one.
        le = (G.unsqueeze(0) <= G.unsqueeze(1)).all(dim=-1)
        lt = (G.unsqueeze(0) < G.unsqueeze(1)).any(dim=-1)
        dominated = (le & lt).any(dim=1)
        front = remaining[~dominated]
        front = front[torch.argsort(F[front, 0], stable=True)]
        taken.append(front)
        count += front.numel()
        remaining = remaining[dominated]
    return torch.cat(taken)[:max_points]


def eval_acqf(acqf: Any, U: Tensor, chunk: int = 128) -> Tensor:
    with torch.no_grad():
        return torch.cat([acqf(U[i : i + chunk].unsqueeze(-2)) for i in range(0, U.shape[0], chunk)])

"""The engine's inputs and their compiled form: ``Problem``, ``Observation``, ``Budgets``, ``Compiled``.

:func:`compile_problem` checks a :class:`Problem` and turns it into the :class:`Compiled` context the
stages share (the space, the cost model, the objective's constants and every tuning option with its
default); :func:`alloc_points` computes (and caches) a compression job's one-shot allocator points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .allocators import ALLOCATORS, Allocation, allocations
from .gp import KERNELS, MEANS
from .objectives import CostModel
from .space import Space


ENGINES = ("auto", "sobol", "gp") + ALLOCATORS
DEFAULT_KERNEL = "rbf"
DEFAULT_MAX_FIT_POINTS = 300
# Above this many (observations x dims) the additive kernel falls back to the plain one.
ADDITIVE_MAX_ND = 8_000
# Pending points beyond this many enter X_pending as the most recent ones only (joint sampling
# over all of them would cost more than it informs).
MAX_PENDING = 128
# At most this many (observations x dims), a GP-stage call gets the full acquisition budgets.
SMALL_ND = 500
# Floor on L before taking its log (L is a relative squared error, 0 only for a lossless trial).
MIN_L = 1e-10


# --------------------------------------------------------------------------- public data


@dataclass(frozen=True)
class Problem:
    """What a job searches and for what.

    Attributes:
        params: Generic jobs: ParameterSpec dicts ``{name, type, low, high, log}``; compression
            jobs: SearchParam dicts ``{name, low, high, size}``.
        objective: ``bocompress.schemas.Objective`` as a dict (``kind``, ``kappa``, ``cost``,
            ``budget``, ``metric``, ``direction``); ``kind`` None means a generic job.
        profile: The ProfileReport dict of a compression job (None for generic jobs).
        n_initial: How many trials the Sobol stage makes (``auto``).
        seed: The job's seed.
        engine: ``auto``, ``sobol`` or ``gp``.
        options: Optional tuning: ``seed_allocators`` (compression ``auto`` jobs start with the
            one-shot allocators' points; default True), ``init`` (``sobol`` | ``perturb``: the rest
            of a compression job's initial design), ``trust_region`` (a TuRBO-style box around
            the incumbent for the GP stage's candidates and acquisition optimizer; default False),
            ``kernel`` (``rbf`` | ``additive``), ``max_fit_points``,
            ``mean`` (``constant`` | ``linear``; default linear for compression jobs, constant
            for generic ones), ``transform`` (generic jobs: ``auto`` | ``none`` | ``power`` |
            ``log`` | ``rank``, the metric's outcome transform, :mod:`bocompress.service.optimizer.transforms`;
            default auto), ``min_gp_obs`` (observations before the GP stage; default
            ``max(2, ceil(n_initial / 2))``), ``rank_snapped`` (default True), ``center``
            (trial 0 is the centre of the space instead of Sobol point 0; default True for
            generic jobs), ``winsorize`` (generic jobs: clip the metric's bad tail at the Tukey
            fence before the fit; default True), ``starts`` (``boltzmann`` | ``best``: how the acquisition
            optimizer's starting points are drawn from the raw candidates; default boltzmann for
            generic jobs), ``local_frac`` (the share of raw candidates that perturb the best
            points; default 0.5 for compression jobs, 0 for generic ones), and any
            :class:`Budgets` field to override the size-adapted budget (experiments).
    """

    params: list[dict]
    objective: dict
    profile: dict | None
    n_initial: int
    seed: int
    engine: str = "auto"
    options: dict | None = None


@dataclass(frozen=True)
class Observation:
    """A completed trial with a finite result.

    Attributes:
        params: The trial's parameters.
        value: Generic jobs: the metric as reported; compression jobs: L (``distill_l2``).
        sem: The standard error of ``value``, if known.
    """

    params: dict[str, float]
    value: float
    sem: float | None = None


@dataclass(frozen=True)
class Budgets:
    """Caps on the work of one GP-stage call.

    Attributes:
        fit_maxiter: L-BFGS iterations of a warm-started fit (twice this when cold).
        num_restarts: Starting points of the acquisition optimizer.
        raw_samples: Candidates scored to choose those starting points.
        maxiter: L-BFGS iterations of the acquisition optimizer per point.
        mc_samples: Quasi-MC samples of the acquisition function.
    """

    fit_maxiter: int = 60
    num_restarts: int = 4
    raw_samples: int = 256
    maxiter: int = 60
    mc_samples: int = 64

    def capped(self, cap: Budgets) -> Budgets:
        """These budgets, each field at most ``cap``'s."""
        return Budgets(**{f.name: min(getattr(self, f.name), getattr(cap, f.name)) for f in fields(Budgets)})


def budgets_for(d: int, n_train: int) -> Budgets:
    """The budgets of a GP-stage call on ``n_train`` observations in ``d`` dims (they shrink as ``d * n_train`` grows)."""
    big = d * n_train
    if big <= SMALL_ND:
        # Small problems: the acquisition optimizer of Ax / BoTorch's defaults (20 restarts from
        # 1024 raw samples, 200 L-BFGS iterations) costs well under a second here.
        return Budgets(fit_maxiter=60, num_restarts=20, raw_samples=1024, maxiter=200, mc_samples=256)
    if big <= 2_000:
        return Budgets(fit_maxiter=60, num_restarts=4, raw_samples=256, maxiter=60, mc_samples=64)
    if big <= 20_000:
        return Budgets(fit_maxiter=40, num_restarts=3, raw_samples=256, maxiter=40, mc_samples=64)
    return Budgets(fit_maxiter=25, num_restarts=2, raw_samples=256, maxiter=25, mc_samples=32)


# --------------------------------------------------------------------------- compiled problem


@dataclass
class Compiled:
    problem: Problem
    space: Space
    kind: str | None
    kappa: float
    budget: float | None
    maximize: bool
    cost: CostModel | None
    kernel: str
    max_fit: int
    mean: str = "constant"
    min_gp_obs: int = 2
    rank_snapped: bool = True
    budget_overrides: dict | None = None
    winsorize: bool = False
    local_frac: float = 0.5
    boltzmann: bool = False
    center: bool = False
    init: str = "sobol"
    alloc: list[dict[str, float]] | None = None
    trust_region: bool = False
    transform: str = "none"

    @property
    def compression(self) -> bool:
        return self.kind is not None

    def exact_r(self, params: Mapping[str, float]) -> float:
        assert self.cost is not None
        return self.cost.exact_ratio(params)

    def feasible_mask(self, U: Tensor) -> Tensor:
        """Which snapped points of ``n x d`` unit coordinates satisfy the budget (all True if none)."""
        if self.kind != "constrained":
            return torch.ones(U.shape[0], dtype=torch.bool)
        assert self.cost is not None and self.budget is not None
        return self.cost(self.space.snap_theta_tensor(U), exact=True) <= self.budget - 1e-12

    def repair(self, U: Tensor) -> Tensor:
        """Scale infeasible points toward ``low`` (unit 0) until their exact R fits the budget.

        Args:
            U: ``n x d`` unit coordinates.

        Returns:
            ``n x d`` unit coordinates; unchanged rows were feasible; a row stays at all-low when
            even all-low exceeds the budget.
        """
        if self.kind != "constrained" or U.shape[0] == 0:
            return U
        ok = self.feasible_mask(U)
        if bool(ok.all()):
            return U
        U = U.clone()
        bad = U[~ok]
        lo = torch.zeros(bad.shape[0], 1, dtype=U.dtype)
        hi = torch.ones(bad.shape[0], 1, dtype=U.dtype)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            fits = self.feasible_mask(bad * mid).unsqueeze(-1)
            lo = torch.where(fits, mid, lo)
            hi = torch.where(fits, hi, mid)
        U[~ok] = bad * lo
        return U


def compile_problem(problem: Problem) -> Compiled:
    if problem.engine not in ENGINES:
        raise ValueError(f"unknown engine {problem.engine!r}; use one of {ENGINES}")
    obj = dict(problem.objective or {})
    kind = obj.get("kind")
    if kind not in (None, "scalarized", "constrained", "pareto"):
        raise ValueError(f"unknown objective kind {kind!r}")
    compression = kind is not None
    space = Space(problem.params, compression=compression)
    cost = None
    budget = None
    if compression:
        if problem.profile is None:
            raise ValueError("a compression problem needs its profile (the ProfileReport dict)")
        cost = CostModel(problem.profile, str(obj.get("cost") or "params"), space.names)
        if kind == "constrained":
            if obj.get("budget") is None:
                raise ValueError("a 'constrained' objective needs a 'budget' (the largest allowed R)")
            budget = float(obj["budget"])
    opts = dict(problem.options or {})
    kernel = str(opts.get("kernel", DEFAULT_KERNEL))
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {KERNELS}")
    mean = str(opts.get("mean", "linear" if compression else "constant"))
    if mean not in MEANS:
        raise ValueError(f"unknown mean {mean!r}; use one of {MEANS}")
    return Compiled(
        problem=problem,
        space=space,
        kind=kind,
        kappa=float(obj.get("kappa", 1.0) or 1.0),
        budget=budget,
        maximize=obj.get("direction", "minimize") == "maximize",
        cost=cost,
        kernel=kernel,
        max_fit=int(opts.get("max_fit_points", DEFAULT_MAX_FIT_POINTS)),
        mean=mean,
        min_gp_obs=int(opts.get("min_gp_obs", max(2, math.ceil(problem.n_initial / 2)))),
        rank_snapped=bool(opts.get("rank_snapped", True)),
        budget_overrides={k: int(opts[k]) for k in Budgets.__dataclass_fields__ if k in opts} or None,
        winsorize=bool(opts.get("winsorize", not compression)),
        local_frac=float(opts.get("local_frac", 0.5 if compression else 0.0)),
        boltzmann=bool(opts.get("starts", "best" if compression else "boltzmann") == "boltzmann"),
        center=bool(opts.get("center", not compression)),
        init=str(opts.get("init", "sobol")),
        trust_region=bool(opts.get("trust_region", False)),
        transform=_transform_option(opts, compression),
        alloc=alloc_points(problem) if compression else None,
    )


def _transform_option(opts: dict, compression: bool) -> str:
    """The generic metric's outcome transform (:mod:`bocompress.service.optimizer.transforms`); compression
    jobs model log L and take none."""
    from .transforms import TRANSFORMS

    name = str(opts.get("transform", "none" if compression else "auto"))
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; use one of {TRANSFORMS}")
    if compression and name != "none":
        raise ValueError("the outcome transform is for generic jobs (compression jobs model log L)")
    return name


def ratio(problem: Problem, params: Mapping[str, float]) -> float:
    """The exact compression ratio R(theta) of a compression problem."""
    if problem.profile is None or (problem.objective or {}).get("kind") is None:
        raise ValueError("ratio() is defined for compression problems only (objective.kind and a profile)")
    from bocompress import costs as exact_costs

    return float(exact_costs.ratio(problem.profile, params, str(problem.objective.get("cost") or "params")))


_ALLOC_CACHE: dict[str, list[dict[str, float]]] = {}


def alloc_points(problem: Problem) -> list[dict[str, float]]:
    """The one-shot allocators' points of a compression job, distinct, in order (cached per job).

    ``auto`` jobs start with every available allocator at each target (``seed_allocators``, on
    by default); an allocator engine (``uniform`` ...) gets its own points only.
    """
    obj = problem.objective or {}
    if obj.get("kind") is None or problem.profile is None:
        return []
    if problem.engine in ALLOCATORS:
        methods: list[str] | None = [problem.engine]
    elif problem.engine == "auto" and bool((problem.options or {}).get("seed_allocators", True)):
        methods = None
    else:
        return []
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([problem.params, obj, problem.profile, methods], sort_keys=True,
                                    default=str).encode()).hexdigest()
    hit = _ALLOC_CACHE.get(key)
    if hit is None:
        space = Space(problem.params, compression=True)
        hit, keys = [], set()
        for a in allocations(problem.profile, problem.params, obj, methods):
            k = space.key(a.theta)
            if k not in keys:
                keys.add(k)
                hit.append(dict(a.theta))
        if len(_ALLOC_CACHE) > 256:
            _ALLOC_CACHE.clear()
        _ALLOC_CACHE[key] = hit
    return [dict(p) for p in hit]


def allocations_of(problem: Problem) -> list[Allocation]:
    """Every available one-shot allocation of a compression job, labelled (for reports)."""
    obj = problem.objective or {}
    if obj.get("kind") is None or problem.profile is None:
        return []
    return allocations(problem.profile, problem.params, obj)

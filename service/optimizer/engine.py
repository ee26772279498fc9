"""``propose``: the next points of a job, from its history. Pure computation, no I/O.

Stages (``Problem.engine``):

- ``sobol``: trial ``i`` takes point ``i`` of the job's scrambled Sobol sequence, mapped to the
  space (log scale, int rounding, the ``k / size`` grid of compression parameters); a generic
  job's trial 0 takes the centre of the space instead (``center``).
- ``gp``: a GP on the modelled outcome (log L for compression jobs, the signed metric for generic
  ones) and a log-EI-family acquisition over the job's objective, with pending trials as
  ``X_pending``:

  * ``scalarized``: qLogNEI of ``-(kappa * exp(log L) + R(theta))``, R exact in form and
    relaxed to be continuous (:class:`~service.optimizer.objectives.CostModel`);
  * ``constrained``: qLogNEI of ``-log L`` with a penalty on the relaxed ``R - budget``; every
    candidate is then repaired (theta scaled toward ``low`` until the exact R fits the budget);
  * ``pareto``: qLogNEHVI over ``(-log L, -R)``, R deterministic;
  * generic: qLogNEI on the metric (negated when minimizing).
- ``uniform`` | ``energy`` | ``global`` | ``knapsack`` (compression jobs): one one-shot allocation
  (:mod:`service.optimizer.allocators`) per target R (the budget of ``constrained``, else 0.25,
  0.5, 0.75), each once; then nothing is left to propose and the job completes.
- ``auto``: for compression jobs, first every available allocator's point at each target
  (``seed_allocators``, default True; the initial design is then ``max(n_initial, #points)``
  long), then Sobol for the rest of the first ``n_initial`` trials (``init="perturb"``:
  perturbations of the allocators' points instead), then the GP. Generic jobs: Sobol, then the GP.
  The Sobol sequence goes on past ``n_initial`` until at least half of the initial design has
  been observed (``min_gp_obs``): with several workers, the first GP batch would otherwise come from a fit on two or three points.

Choices measured on the benchmarks (``bench/bo_quality.py``, ``docs/benchmarks.md``):

- compression GPs use a linear prior mean on log L (``mean="linear"``): L falls as every theta
  grows, and a constant mean made the heavily compressed corner (smallest R, mean-reverted L) look
  good to the acquisition, which then spent a parallel job's GP stage there;
- the best candidates are re-scored at the point actually proposed (after the constrained repair
  and the snapping to the ``k / size`` grid) before one is chosen (``rank_snapped``);
- generic jobs follow Ax's / BoTorch's defaults where ours differed: trial 0 is the centre of the
  space (``center``), the metric's bad tail is winsorized at the Tukey fence before the fit
  (``winsorize``; a stationary GP fitted to Branin's 0.4..300 range resolves its minima poorly),
  and the acquisition optimizer starts from a Boltzmann draw over a Sobol cloud (``starts``,
  ``local_frac=0``) with, on small problems (observations x dims <= ``SMALL_ND``), 20 restarts
  from 1024 raw samples and 200 L-BFGS iterations. Median best over seeds 0-9 of noiseless
  synthetic functions, n_initial 8 (Ax: centre + 4 Sobol): Branin (25 trials) 0.4046 vs Ax
  0.4007; Hartmann6 (40) -3.284 vs Ax -3.291; Ackley-10 (40) 4.35 vs Ax 3.80 (on seeds 0-4,
  the published table: 0.404, -3.275, 3.795 vs Ax 0.4004, -3.282, 3.816). Before, on seeds
  0-4: 0.4092, -3.197, 4.97. So on Branin and Hartmann6 we are level with Ax within the
  seed-to-seed spread; on Ackley-10 ahead on seeds 0-4 but behind over ten. Measured and not
  kept: the centre
  alone (seeds 0-9: 0.4045, -3.221, 4.76); larger budgets with the best-first starts and the
  incumbent perturbations (seeds 0-4: 0.4103, -3.199, 6.29); an inferred noise instead of the
  reported sem 0 (0.447, -3.193, 5.09). Ax's remaining lead on Ackley-10 is not its shorter
  initial design: without winsorizing, bocompress with n_initial 5 scored 4.96 on seeds 0-4
  (4.39 with 8); on Branin n_initial 5 scored 0.3996 over seeds 0-9 (0.4046 with 8);
- compression jobs keep the best-first starts and the perturbations of the best points
  (``local_frac=0.5``; what finds improvements in dozens of dimensions); the small-problem budgets
  left both compression benchmarks unchanged seed for seed. A per-layer sensitivity scan as the
  initial design (the centre, then each layer alone moved to theta_min) did worse on the
  scalarized task (seeds 0-2: 0.382, 0.382, 0.188 vs 0.190, 0.388, 0.175) and is not used; the
  break-even bound on each theta_l is already the SearchParam's ``high`` in the worker's profile.

- on trained deep nets (``bench/compression_quality.py``, ResNet-20 at R <= 0.5, one seed, two
  cells) the allocators' points as the first trials gave bocompress the best allocator's L at
  once (0.0249 tucker2+svd, 0.0570 channel_l1; TPE 0.040 / 0.221, Ax 0.045 / 0.206), and the
  GP stage found nothing better in 26 more trials; with ``trust_region`` it did (0.0216, 0.0451).
  One seed per cell is too little to change the default, so ``trust_region`` stays off.

Every call is reproducible: same inputs, same outputs (all randomness is seeded from the job's
seed and the history's size). Budgets are capped and adapt to the size of the problem, so a
call stays within about a second for a hundred observations in 16 dims and a few seconds for a
thousand in 64 dims (above ``max_fit_points`` observations the GP is fitted on the best points
plus a seeded random subset of the rest).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
from botorch.acquisition.objective import GenericMCObjective
from botorch.exceptions.warnings import BotorchWarning, OptimizationWarning
from botorch.optim import optimize_acqf
from botorch.sampling.normal import SobolQMCNormalSampler
from torch import Tensor

from .allocators import ALLOCATORS, Allocation, allocations
from .gp import KERNELS, MEANS, MIN_YVAR, fit_gp
from bocompress.objective import job_objective

from .objectives import CostModel, composite
from .sobol import MAX_SOBOL_DIM, sobol_points
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
            for generic ones), ``min_gp_obs`` (observations before the GP stage; default
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


# Intra-op threads torch uses inside ``propose`` (restored afterwards). The GP problems here are
# small: on a busy 2-core host two threads spin against each other and run ~5x slower than one.
# None leaves torch's setting alone.
THREADS: int | None = 1
_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    with _THREAD_LOCK:
        prev = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(prev)


# Set by ``fast_mode()``: tests run with tiny budgets (as BoTorch's ``mock_optimize``).
_FAST: Budgets | None = None


@contextlib.contextmanager
def fast_mode(budgets: Budgets | None = None) -> Iterator[None]:
    """Cap every budget to a few iterations while the context is active (for tests)."""
    global _FAST
    prev = _FAST
    _FAST = budgets or Budgets(fit_maxiter=15, num_restarts=2, raw_samples=64, maxiter=15, mc_samples=32)
    try:
        yield
    finally:
        _FAST = prev


def _budgets(d: int, n_train: int) -> Budgets:
    if _FAST is not None:
        return _FAST
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
class _Ctx:
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


def _compile(problem: Problem) -> _Ctx:
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
    return _Ctx(
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
        alloc=_alloc_points(problem) if compression else None,
    )


# --------------------------------------------------------------------------- public functions


def ratio(problem: Problem, params: Mapping[str, float]) -> float:
    """The exact compression ratio R(theta) of a compression problem."""
    if problem.profile is None or (problem.objective or {}).get("kind") is None:
        raise ValueError("ratio() is defined for compression problems only (objective.kind and a profile)")
    from bocompress import costs as exact_costs

    return float(exact_costs.ratio(problem.profile, params, str(problem.objective.get("cost") or "params")))


def composite_value(problem: Problem, params: Mapping[str, float], value: float) -> float:
    """The job objective of a completed trial (see :func:`~service.optimizer.objectives.composite`).

    ``scalarized`` (and ``pareto``, ranked by its scalarization): ``kappa * L + R``;
    ``constrained``: L (ranked after every feasible trial when over budget); generic: the value.
    """
    obj = problem.objective or {}
    kind = obj.get("kind")
    if kind is None:
        return float(value)
    return composite(kind, float(obj.get("kappa", 1.0) or 1.0), float(value), ratio(problem, params), obj.get("budget"))


_ALLOC_CACHE: dict[str, list[dict[str, float]]] = {}


def _alloc_points(problem: Problem) -> list[dict[str, float]]:
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


def _n_initial(problem: Problem) -> int:
    if problem.engine == "auto" and (problem.objective or {}).get("kind") is not None:
        return max(problem.n_initial, len(_alloc_points(problem)))
    return problem.n_initial


def _in_initial_design(problem: Problem, index: int) -> bool:
    if problem.engine in ALLOCATORS:
        return True
    return problem.engine == "sobol" or (problem.engine == "auto" and index < _n_initial(problem))


def initial_design_only(problem: Problem, n_existing: int, n: int) -> bool:
    """Whether trials ``n_existing .. n_existing + n - 1`` are all initial-design (Sobol) points:
    then ``propose`` fits no GP and needs the history only to avoid duplicates."""
    return n == 0 or _in_initial_design(problem, n_existing + n - 1)


def point_key(problem: Problem) -> Any:
    """The function ``params -> key`` that ``propose`` uses to tell points apart (after snapping)."""
    return Space(problem.params, compression=(problem.objective or {}).get("kind") is not None).key


def propose(
    problem: Problem,
    observations: list[Observation],
    pending: list[dict[str, float]],
    n_existing: int,
    n: int,
    state: dict | None = None,
    keys: tuple[list[tuple[int, ...]], list[tuple[int, ...]]] | None = None,
) -> tuple[list[dict[str, float]], dict]:
    """The next ``n`` points of a job.

    Args:
        problem: The job's search space and objective.
        observations: Completed trials with finite values.
        pending: Parameters of queued and running trials (they enter the acquisition as
            ``X_pending``, and are never proposed again).
        n_existing: How many trials the job has created so far; trial ``n_existing + j`` takes
            Sobol point ``n_existing + j`` while in the initial design.
        n: How many points to propose.
        state: The job's warm-start cache from the last call (GP hyperparameters), or None.
        keys: ``point_key`` of every observation and pending point (same order), when the
            caller keeps them (the service does, per trial): spares recomputing them for the
            whole history on every call.

    Returns:
        The points (a list of parameter dicts, distinct from each other and from every
        observed or pending point after rounding) and the updated state. Fewer than ``n``
        points come back only when the space has no unseen point left (a small discrete
        space, or a constrained job whose all-low point is the only one and already seen).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n_existing < 0:
        raise ValueError(f"n_existing must be >= 0, got {n_existing}")
    ctx = _compile(problem)
    new_state: dict[str, Any] = dict(state or {})
    if n == 0:
        return [], new_state
    finite = [math.isfinite(float(o.value)) for o in observations]
    obs = [o for o, ok in zip(observations, finite) if ok]
    if keys is None:
        obs_keys = [ctx.space.key(o.params) for o in obs]
        pending_keys = [ctx.space.key(p) for p in pending]
    else:
        obs_keys = [k for k, ok in zip(keys[0], finite) if ok]
        pending_keys = list(keys[1])
    seen: set[tuple[int, ...]] = set(obs_keys)
    distinct_obs = len(seen)
    seen.update(pending_keys)
    # Until enough of the initial design has come back (workers run several trials at once), the
    # Sobol sequence goes on: a GP fitted on two or three points would spend the whole next batch.
    gp_ready = problem.engine != "sobol" and distinct_obs >= (2 if problem.engine == "gp" else ctx.min_gp_obs)

    slots_sobol: list[int] = []
    slots_gp: list[int] = []
    for j in range(n):
        (slots_sobol if _in_initial_design(problem, n_existing + j) or not gp_ready else slots_gp).append(j)

    mix = (int(problem.seed) * 1_000_003 + int(n_existing) * 7919 + len(obs) * 104_729 + len(pending)) % (2**31 - 1)
    chosen: dict[int, list[float]] = {}
    with _torch_threads(THREADS), torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizationWarning)
        warnings.simplefilter("ignore", BotorchWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(mix)
        # One scrambled engine for the whole batch (the same points as one engine per slot: a
        # wide buffer's refill of hundreds of Sobol points would otherwise scramble hundreds).
        drawn = (sobol_points(ctx.space.d, problem.seed, n_existing, n)
                 if slots_sobol and ctx.space.d <= MAX_SOBOL_DIM else None)
        if problem.engine in ALLOCATORS:
            # A one-shot job: its allocator's points in order, each once; then nothing is left.
            todo = [ctx.space.snap(ctx.space.to_unit(p)) for p in ctx.alloc or []]
            todo = [u for u in todo if ctx.space.unit_key(u) not in seen][: len(slots_sobol)]
            for j, u in zip(slots_sobol, todo):
                chosen[j] = u
                seen.add(ctx.space.unit_key(u))
            slots_sobol = []
        for j in slots_sobol:
            u = _initial_slot(ctx, n_existing + j, seen, mix, obs)
            if u is None:
                u = _sobol_slot(ctx, n_existing + j, seen, mix, None if drawn is None else drawn[j:j + 1])
            if u is not None:
                chosen[j] = u
                seen.add(ctx.space.unit_key(u))
        if slots_gp:
            gp_points, gp_state = _gp_stage(ctx, obs, pending, [chosen[j] for j in sorted(chosen)], len(slots_gp), seen, new_state.get("gp"), mix)
            new_state["gp"] = gp_state
            for j, u in zip(slots_gp, gp_points):
                chosen[j] = u
    points = [ctx.space.from_unit(chosen[j]) for j in range(n) if j in chosen]
    if ctx.kind == "constrained":
        points = [_ensure_feasible(ctx, p) for p in points]
    return points, new_state


# --------------------------------------------------------------------------- Sobol stage


def _initial_slot(ctx: _Ctx, index: int, seen: set[tuple[int, ...]], mix: int,
                  obs: list[Observation]) -> list[float] | None:
    """A compression job's initial-design point other than Sobol's, or None to take Sobol's.

    Trials ``0 .. len(alloc) - 1`` take the allocators' points (unless already seen). Later
    initial trials take Sobol points, or with ``init="perturb"`` perturbations of the allocators'
    points (a random ~20-coordinate subset moved, as the GP stage's local candidates), which stay
    near the informative region a Sobol design in 20+ dimensions misses.
    """
    alloc = ctx.alloc or []
    if index < len(alloc):
        u = _accept(ctx, torch.tensor([ctx.space.to_unit(alloc[index])], dtype=torch.float64), seen)
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
        u = _accept(ctx, U, seen)
        if u is not None:
            return u
    return None


def _ensure_feasible(ctx: _Ctx, p: dict[str, float]) -> dict[str, float]:
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


def _accept(ctx: _Ctx, U: Tensor, seen: set[tuple[int, ...]]) -> list[float] | None:
    """The first row of ``U`` (unit coordinates, repaired if constrained) not yet seen, snapped."""
    U = ctx.repair(U.clamp(0.0, 1.0))
    for row in U.tolist():
        u = ctx.space.snap(row)
        if ctx.space.unit_key(u) not in seen:
            return u
    return None


def _sobol_slot(ctx: _Ctx, index: int, seen: set[tuple[int, ...]], mix: int,
                point: Tensor | None = None) -> list[float] | None:
    """Sobol point ``index`` (``point``, when the caller drew it already) mapped to the space;
    seeded uniform draws when it is taken."""
    d = ctx.space.d
    if index == 0 and ctx.center:
        u = _accept(ctx, torch.full((1, d), 0.5, dtype=torch.float64), seen)
        if u is not None:
            return u
    u = _accept(ctx, sobol_points(d, ctx.problem.seed, index, 1) if point is None else point, seen)
    if u is not None:
        return u
    g = torch.Generator().manual_seed((mix + 31 * index) % (2**31 - 1))
    for _ in range(8):
        u = _accept(ctx, torch.rand(64, d, generator=g, dtype=torch.float64), seen)
        if u is not None:
            return u
    return None


# --------------------------------------------------------------------------- GP stage


def _training_data(ctx: _Ctx, obs: list[Observation]) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
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
        if ctx.winsorize and Y.numel() >= 4:
            Y = _winsorize_low(Y)
    Yvar = None
    if have_sem:
        floor = max(MIN_YVAR * float(Y.var()) if Y.numel() > 1 else MIN_YVAR, 1e-10)
        Yvar = var.clamp_min(floor).unsqueeze(-1)
    return X, Y.unsqueeze(-1), Yvar, J


def _winsorize_low(Y: Tensor) -> Tensor:
    """Clip values below the lower Tukey fence ``q1 - 1.5 IQR`` (Y is larger-is-better)."""
    ys = torch.sort(Y).values
    n = ys.numel()
    q1 = ys[int(math.floor(0.25 * (n - 1)))]
    q3 = ys[int(math.ceil(0.75 * (n - 1)))]
    return Y.clamp_min(float(q1 - 1.5 * (q3 - q1)))


def _subset(ctx: _Ctx, J: Tensor, mix: int) -> Tensor:
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


def _build_acqf(ctx: _Ctx, model: Any, X: Tensor, Y: Tensor, X_pending: Tensor | None, mc: int, seed: int) -> Any:
    """The acquisition function of the job's objective (see the module docstring)."""
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
    keep = _front_layers(torch.stack([logl, r_obs], dim=-1), min_points=10, max_points=30)
    span_l = float(logl.max() - logl.min()) + 1e-3
    span_r = float(r_obs.max() - r_obs.min()) + 1e-3
    ref = torch.tensor([-(float(logl.max()) + 0.1 * span_l), -(float(r_obs.max()) + 0.1 * span_r)], dtype=X.dtype)
    return qLogNoisyExpectedHypervolumeImprovement(
        model, ref_point=ref, X_baseline=X[keep], sampler=sampler, objective=GenericMCMultiOutputObjective(mobj),
        X_pending=X_pending, prune_baseline=False, cache_root=False,
    )


def _front_layers(F: Tensor, min_points: int, max_points: int) -> Tensor:
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


def _raw_candidates(ctx: _Ctx, X: Tensor, J: Tensor, n_raw: int, g: torch.Generator) -> Tensor:
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


def _boltzmann_pick(vals: Tensor, k: int, g: torch.Generator, eta: float = 1.0) -> Tensor:
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


def _rank_proposed(ctx: _Ctx, acqf: Any, ranked: Tensor, head: int = 64) -> Tensor:
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
    vals = _eval_acqf(acqf, snapped)
    order = torch.argsort(vals, descending=True, stable=True)
    return torch.cat([snapped[order], ranked[head:]])


def _eval_acqf(acqf: Any, U: Tensor, chunk: int = 128) -> Tensor:
    with torch.no_grad():
        return torch.cat([acqf(U[i : i + chunk].unsqueeze(-2)) for i in range(0, U.shape[0], chunk)])


# TuRBO-style trust region (Eriksson et al. 2019), sized for budgets of tens of trials: the box
# side in unit coordinates starts at TR_INIT, doubles after TR_SUCC improvements in a row (up to
# TR_MAX), halves after TR_FAIL trials without one (down to TR_MIN, then restarts at TR_INIT).
TR_INIT, TR_MIN, TR_MAX = 0.4, 0.02, 1.6
TR_SUCC, TR_FAIL = 2, 3


def _trust_region(ctx: _Ctx, J: Tensor, tr: dict | None) -> dict:
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


def _tr_box(X: Tensor, J: Tensor, length: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(centre, lower, upper)`` of the trust region around the best observation (unit coordinates)."""
    centre = X[int(torch.argmin(J))]
    lo = (centre - length / 2).clamp(0.0, 1.0)
    hi = (centre + length / 2).clamp(0.0, 1.0)
    return centre, lo, hi


def _tr_candidates(ctx: _Ctx, centre: Tensor, lo: Tensor, hi: Tensor, n: int, g: torch.Generator) -> Tensor:
    """TuRBO's candidates: Sobol points in the box, each moving only a random ~20-coordinate subset."""
    d = ctx.space.d
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    pert = lo + (hi - lo) * sobol_points(d, seed, 0, n)
    prob = min(1.0, 20.0 / d)
    mask = torch.rand(n, d, generator=g, dtype=centre.dtype) < prob
    none = ~mask.any(dim=-1)
    mask[none, torch.randint(0, d, (int(none.sum()),), generator=g)] = True
    return ctx.repair(torch.where(mask, pert, centre.expand(n, d)))


def _gp_stage(
    ctx: _Ctx,
    obs: list[Observation],
    pending: list[dict[str, float]],
    chosen_sobol: list[list[float]],
    n: int,
    seen: set[tuple[int, ...]],
    gp_state: dict | None,
    mix: int,
) -> tuple[list[list[float]], dict]:
    """``n`` points from the GP, chosen one after another with the earlier ones as pending."""
    space = ctx.space
    X_all, Y_all, Yvar_all, J_all = _training_data(ctx, obs)
    idx = _subset(ctx, J_all, mix)
    X, Y, J = X_all[idx], Y_all[idx], J_all[idx]
    Yvar = Yvar_all[idx] if Yvar_all is not None else None
    b = _budgets(space.d, X.shape[0])
    if ctx.budget_overrides and _FAST is None:
        b = Budgets(**{**b.__dict__, **ctx.budget_overrides})
    kernel = ctx.kernel
    if kernel == "additive" and X.shape[0] * space.d > ADDITIVE_MAX_ND:
        kernel = "rbf"  # the additive kernel's n x n x d tensors get too large
    model, new_gp_state = fit_gp(X, Y, Yvar, kernel, gp_state, b.fit_maxiter, ctx.mean)
    pend = [space.snap(space.to_unit(p)) for p in pending[-MAX_PENDING:]] + list(chosen_sobol)
    g = torch.Generator().manual_seed(mix)
    bounds = torch.stack([torch.zeros(space.d), torch.ones(space.d)]).to(torch.float64)
    box = None
    if ctx.trust_region:
        tr = _trust_region(ctx, J_all, gp_state.get("tr") if gp_state else None)
        new_gp_state = {**new_gp_state, "tr": tr}
        box = _tr_box(X_all, J_all, float(tr["length"]))
        bounds = torch.stack([box[1], box[2]])
    out: list[list[float]] = []
    for _ in range(n):
        Xp = torch.tensor(pend + out, dtype=torch.float64) if (pend or out) else None
        acqf = _build_acqf(ctx, model, X, Y, Xp, b.mc_samples, mix)
        if box is not None:
            raw = _tr_candidates(ctx, *box, b.raw_samples, g)
        else:
            raw = _raw_candidates(ctx, X, J, b.raw_samples, g)
        raw_val = _eval_acqf(acqf, raw)
        order = torch.argsort(raw_val, descending=True, stable=True)
        if ctx.boltzmann and b.num_restarts > 1:
            starts = raw[_boltzmann_pick(raw_val, b.num_restarts, g)].unsqueeze(-2)
        else:
            starts = raw[order[: b.num_restarts]].unsqueeze(-2)  # restarts x 1 x d
        if box is not None:  # the constrained repair may move a start below the box: clamp it in
            starts = torch.maximum(torch.minimum(starts, box[2]), box[1])
        cand, cand_val = optimize_acqf(
            acqf, bounds=bounds, q=1, num_restarts=starts.shape[0], batch_initial_conditions=starts,
            options={"maxiter": b.maxiter, "batch_limit": starts.shape[0]}, return_best_only=False,
            retry_on_optimization_warning=False,
        )
        cand = cand.reshape(-1, space.d)
        cand_val = cand_val.reshape(-1)
        ranked = torch.cat([cand[torch.argsort(cand_val, descending=True, stable=True)], raw[order]])
        if ctx.rank_snapped and (ctx.kind == "constrained" or any(dm.kind != "float" for dm in space.dims)):
            ranked = _rank_proposed(ctx, acqf, ranked)
        u = _accept(ctx, ranked, seen)
        if u is None:
            for _ in range(8):
                u = _accept(ctx, torch.rand(64, space.d, generator=g, dtype=torch.float64), seen)
                if u is not None:
                    break
        if u is None:
            break
        out.append(u)
        seen.add(space.unit_key(u))
    return out, new_gp_state

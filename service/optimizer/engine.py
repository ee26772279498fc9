"""``propose``: the next points of a job, from its history. Pure computation, no I/O.

Stages (``Problem.engine``):

- ``sobol``: trial ``i`` takes point ``i`` of the job's scrambled Sobol sequence, mapped to the
  space (log scale, int rounding, the ``k / size`` grid of compression parameters); a generic
  job's trial 0 takes the centre of the space instead (``center``).
- ``gp``: a GP on the modelled outcome (log L for compression jobs, the signed metric for generic
  ones) and a log-EI-family acquisition over the job's objective, with pending trials as
  ``X_pending``:

  * ``scalarized``: qLogNEI of ``-(kappa * exp(log L) + R(theta))``, R exact in form and
    relaxed to be continuous (:class:`~bocompress.service.optimizer.objectives.CostModel`);
  * ``constrained``: qLogNEI of ``-log L`` with a penalty on the relaxed ``R - budget``; every
    candidate is then repaired (theta scaled toward ``low`` until the exact R fits the budget);
  * ``pareto``: qLogNEHVI over ``(-log L, -R)``, R deterministic;
  * generic: qLogNEI on the metric (negated when minimizing), modelled after a monotone outcome
    transform chosen from the data (:mod:`~bocompress.service.optimizer.transforms`: Yeo-Johnson when the
    metric's bad tail is heavy, else none), incumbents ranked by the metric as reported.
- ``uniform`` | ``energy`` | ``global`` | ``knapsack`` (compression jobs): one one-shot allocation
  (:mod:`bocompress.service.optimizer.allocators`) per target R (the budget of ``constrained``, else 0.25,
  0.5, 0.75), each once; then nothing is left to propose and the job completes.
- ``auto``: for compression jobs, first every available allocator's point at each target
  (``seed_allocators``, default True; the initial design is then ``max(n_initial, #points)``
  long), then Sobol for the rest of the first ``n_initial`` trials (``init="perturb"``:
  perturbations of the allocators' points instead), then the GP. Generic jobs: Sobol, then the GP.
  The Sobol sequence goes on past ``n_initial`` until at least half of the initial design has
  been observed (``min_gp_obs``): with several workers, the first GP batch would otherwise come
  from a fit on two or three points.

The stages live in their own modules: :mod:`~bocompress.service.optimizer.problem` (inputs, budgets, the
compiled problem), :mod:`~bocompress.service.optimizer.initial` (the initial design),
:mod:`~bocompress.service.optimizer.acquisition` (training data, acquisition functions) and
:mod:`~bocompress.service.optimizer.candidates` (starting points, re-ranking, the trust region). Why the
defaults are what they are, with the measurements behind them: ``docs/benchmarks.md``, section
"Engine design notes (measured)".

Every call is reproducible: same inputs, same outputs (all randomness is seeded from the job's
seed and the history's size). Budgets are capped and adapt to the size of the problem (above
``max_fit_points`` observations the GP is fitted on the best points plus a seeded random subset
of the rest); a caller may cap them further (``propose(..., cap=Budgets(...))``, as tests do).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from botorch.exceptions.warnings import BotorchWarning, OptimizationWarning
from botorch.optim import optimize_acqf

from .acquisition import build_acqf, eval_acqf, fit_subset, training_data
from .allocators import ALLOCATORS
from .candidates import boltzmann_pick, raw_candidates, rank_proposed, tr_box, tr_candidates, update_trust_region
from .gp import fit_gp
from .initial import accept, ensure_feasible, in_initial_design, initial_slot, sobol_slot
from .problem import (
    ADDITIVE_MAX_ND,
    MAX_PENDING,
    Budgets,
    Compiled,
    Observation,
    Problem,
    budgets_for,
    compile_problem,
)
from .sobol import MAX_SOBOL_DIM, sobol_points
from .space import Space


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


def initial_design_only(problem: Problem, n_existing: int, n: int) -> bool:
    """Whether trials ``n_existing .. n_existing + n - 1`` are all initial-design (Sobol) points:
    then ``propose`` fits no GP and needs the history only to avoid duplicates."""
    return n == 0 or in_initial_design(problem, n_existing + n - 1)


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
    cap: Budgets | None = None,
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
        cap: Upper bounds on the GP stage's budgets (each field of the size-adapted
            :class:`Budgets`, after the problem's overrides, is at most ``cap``'s). None: no
            cap, the budgets the service runs with. Tests pass small caps so a GP-stage call
            takes a fraction of a second (as BoTorch's ``mock_optimize``).

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
    ctx = compile_problem(problem)
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
        (slots_sobol if in_initial_design(problem, n_existing + j) or not gp_ready else slots_gp).append(j)

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
            u = initial_slot(ctx, n_existing + j, seen, mix, obs)
            if u is None:
                u = sobol_slot(ctx, n_existing + j, seen, mix, None if drawn is None else drawn[j:j + 1])
            if u is not None:
                chosen[j] = u
                seen.add(ctx.space.unit_key(u))
        if slots_gp:
            gp_points, gp_state = _gp_stage(ctx, obs, pending, [chosen[j] for j in sorted(chosen)], len(slots_gp), seen, new_state.get("gp"), mix, cap)
            new_state["gp"] = gp_state
            for j, u in zip(slots_gp, gp_points):
                chosen[j] = u
    points = [ctx.space.from_unit(chosen[j]) for j in range(n) if j in chosen]
    if ctx.kind == "constrained":
        points = [ensure_feasible(ctx, p) for p in points]
    return points, new_state


# --------------------------------------------------------------------------- GP stage


def _gp_stage(
    ctx: Compiled,
    obs: list[Observation],
    pending: list[dict[str, float]],
    chosen_sobol: list[list[float]],
    n: int,
    seen: set[tuple[int, ...]],
    gp_state: dict | None,
    mix: int,
    cap: Budgets | None = None,
) -> tuple[list[list[float]], dict]:
    """``n`` points from the GP, chosen one after another with the earlier ones as pending."""
    space = ctx.space
    X_all, Y_all, Yvar_all, J_all = training_data(ctx, obs)
    idx = fit_subset(ctx, J_all, mix)
    X, Y, J = X_all[idx], Y_all[idx], J_all[idx]
    Yvar = Yvar_all[idx] if Yvar_all is not None else None
    b = budgets_for(space.d, X.shape[0])
    if ctx.budget_overrides:
        b = Budgets(**{**b.__dict__, **ctx.budget_overrides})
    if cap is not None:
        b = b.capped(cap)
    kernel = ctx.kernel
    if kernel == "additive" and X.shape[0] * space.d > ADDITIVE_MAX_ND:
        kernel = "rbf"  # the additive kernel's n x n x d tensors get too large
    model, new_gp_state = fit_gp(X, Y, Yvar, kernel, gp_state, b.fit_maxiter, ctx.mean)
    pend = [space.snap(space.to_unit(p)) for p in pending[-MAX_PENDING:]] + list(chosen_sobol)
    g = torch.Generator().manual_seed(mix)
    bounds = torch.stack([torch.zeros(space.d), torch.ones(space.d)]).to(torch.float64)
    box = None
    if ctx.trust_region:
        tr = update_trust_region(ctx, J_all, gp_state.get("tr") if gp_state else None)
        new_gp_state = {**new_gp_state, "tr": tr}
        box = tr_box(X_all, J_all, float(tr["length"]))
        bounds = torch.stack([box[1], box[2]])
    out: list[list[float]] = []
    for _ in range(n):
        Xp = torch.tensor(pend + out, dtype=torch.float64) if (pend or out) else None
        acqf = build_acqf(ctx, model, X, Y, Xp, b.mc_samples, mix)
        if box is not None:
            raw = tr_candidates(ctx, *box, b.raw_samples, g)
        else:
            raw = raw_candidates(ctx, X, J, b.raw_samples, g)
        raw_val = eval_acqf(acqf, raw)
        order = torch.argsort(raw_val, descending=True, stable=True)
        if ctx.boltzmann and b.num_restarts > 1:
            starts = raw[boltzmann_pick(raw_val, b.num_restarts, g)].unsqueeze(-2)
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
            ranked = rank_proposed(ctx, acqf, ranked)
        u = accept(ctx, ranked, seen)
        if u is None:
            for _ in range(8):
                u = accept(ctx, torch.rand(64, space.d, generator=g, dtype=torch.float64), seen)
                if u is not None:
                    break
        if u is None:
            break
        out.append(u)
        seen.add(space.unit_key(u))
    return out, new_gp_state

"""One-shot allocators: a theta for a target R in one evaluation, from the profile alone.

Pure Python and NumPy (no torch): each allocator turns the profile's per-layer ``signals`` (see
``/work/prompts/interface.md``; the worker measures them at profiling) and the exact cost forms
into one theta whose exact R (``bocompress.costs.ratio``) is at most the target:

- ``uniform``: the same theta for every layer (clipped to each layer's range), bisected on R.
  Needs no signals, so it always works.
- ``energy``: the same fraction of importance mass kept in every layer (spectral energy for
  svd/tucker2, kept weight or group-score mass for pruning), bisected on R.
- ``global``: a global LAMP-style threshold tau: each layer keeps what scores above tau
  (``theta_l = min{theta_k : lamp_k <= tau}``), tau bisected on R (Torch-Pruning's
  ``global_pruning``, Lee et al.'s LAMP).
- ``knapsack``: the measured per-layer sensitivity curves, minimizing ``sum_l L_l(theta_l)``
  subject to R <= target by a dynamic programme over the (additive) layer costs, checked and
  tightened on the exact R.

After the bisection every allocator tops the point up: one pass over the parameters, in the
allocator's order of priority, raising each by one grid step while the exact R stays within the
target, so the point uses the budget up to grid rounding.

An allocator whose signals the profile lacks is not available (:func:`available`); profiles
written before the signals existed get ``uniform`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bocompress import costs as exact_costs

ALLOCATORS = ("uniform", "energy", "global", "knapsack")
#: The target ratios of a ``scalarized`` or ``pareto`` job (which has no budget of its own).
DEFAULT_TARGETS = (0.25, 0.5, 0.75)
_BISECT_STEPS = 48


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


@dataclass(frozen=True)
class Allocation:
    """One allocator's point.

    Attributes:
        method: The allocator.
        target: The target R it was asked for.
        theta: The point (every search parameter, on its ``k / size`` grid).
        ratio: Its exact R.
        feasible: Whether ``ratio <= target`` (False only when even theta_min everywhere is over).
    """

    method: str
    target: float
    theta: dict[str, float]
    ratio: float
    feasible: bool


@dataclass
class _Param:
    name: str
    low: float
    high: float
    size: int
    signals: dict | None = None
    grid: list[float] = field(default_factory=list)

    @property
    def k_range(self) -> tuple[int, int]:
        k_lo = max(1, math.ceil(self.low * self.size - 1e-9))
        k_hi = min(self.size, math.floor(self.high * self.size + 1e-9))
        return (k_lo, k_hi) if k_lo <= k_hi else (0, -1)

    def snap(self, theta: float) -> float:
        """Theta clipped to the range and snapped to ``k / size`` (the engine's ``Space`` rounding)."""
        theta = min(max(float(theta), self.low), self.high)
        if self.size <= 0:
            return theta
        k_lo, k_hi = self.k_range
        if k_lo > k_hi:
            return self.low
        k = min(max(math.floor(theta * self.size + 0.5), k_lo), k_hi)
        return k / self.size

    def step_up(self, theta: float) -> float | None:
        """The next grid value above ``theta`` (None at the top)."""
        if self.size <= 0:
            nxt = min(self.high, theta + 1.0 / 64)
            return nxt if nxt > theta + 1e-12 else None
        k_lo, k_hi = self.k_range
        k = round(theta * self.size)
        if k_lo > k_hi or k >= k_hi:
            return None
        return (k + 1) / self.size

    @property
    def smallest(self) -> float:
        return self.snap(self.low)


class _Problem:
    """The parameters of a compression job with their signals, and its exact R."""

    def __init__(self, profile: Any, space: Sequence[Mapping[str, Any]], cost: str) -> None:
        self.profile = profile
        self.cost = cost
        layers = list(_get(profile, "layers") or [])
        by_name = {str(_get(layer, "name")): layer for layer in layers}
        self.params: list[_Param] = []
        for sp in space:
            name = str(sp["name"])
            self.params.append(_Param(name, float(sp["low"]), float(sp["high"]), int(sp.get("size") or 0),
                                      _signals_of(name, by_name, layers)))

    def ratio(self, theta: Mapping[str, float]) -> float:
        return float(exact_costs.ratio(self.profile, theta, self.cost))

    def smallest(self) -> dict[str, float]:
        return {p.name: p.smallest for p in self.params}


def _valid_signals(sig: Any) -> bool:
    if not isinstance(sig, Mapping):
        return False
    grid = sig.get("grid")
    return isinstance(grid, list) and len(grid) >= 2


def _signals_of(name: str, by_name: Mapping[str, Any], layers: Sequence[Any]) -> dict | None:
    """The signals that describe parameter ``name``.

    The layer of the same name (svd, tucker2, magnitude: one parameter per layer; channel pruning:
    a group's parameter is named after its leading layer), else a layer whose signals name the
    parameter (``signals.param``), else the only layer whose single parameter it is.
    """
    layer = by_name.get(name)
    if layer is not None and _valid_signals(_get(layer, "signals")):
        return dict(_get(layer, "signals"))
    own = []
    for layer in layers:
        sig = _get(layer, "signals")
        if not _valid_signals(sig):
            continue
        if sig.get("param") == name:
            return dict(sig)
        if list(_get(layer, "params") or []) == [name]:
            own.append(sig)
    return dict(own[0]) if len(own) == 1 else None


# --------------------------------------------------------------------------- curves


def _inverse_increasing(xs: Sequence[float], ys: Sequence[float], level: float) -> float:
    """The smallest x with the linearly interpolated y(x) >= level (ys nondecreasing)."""
    if level <= ys[0]:
        return xs[0]
    for i in range(1, len(xs)):
        if ys[i] >= level:
            y0, y1 = ys[i - 1], ys[i]
            if y1 <= y0:
                return xs[i]
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (level - y0) / (y1 - y0)
    return xs[-1]


def _first_below(xs: Sequence[float], ys: Sequence[float], tau: float) -> float:
    """``min{x_k : y_k <= tau}`` (ys nonincreasing; the last x when none)."""
    for x, y in zip(xs, ys):
        if y <= tau:
            return x
    return xs[-1]


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-12)
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


# --------------------------------------------------------------------------- helpers


def _bisect(prob: _Problem, family: Callable[[float], dict[str, float]], target: float) -> dict[str, float]:
    """The point ``family(s)`` with the largest ``s`` in [0, 1] whose exact R fits ``target``.

    ``family`` must keep more (R nondecreasing) as ``s`` grows; ``family(0)`` should be the
    smallest point of the space.
    """
    top = family(1.0)
    if prob.ratio(top) <= target:
        return top
    lo, hi = 0.0, 1.0
    best = family(0.0)
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        pt = family(mid)
        if prob.ratio(pt) <= target:
            lo, best = mid, pt
        else:
            hi = mid
    return best


def _top_up(prob: _Problem, theta: dict[str, float], target: float, order: Sequence[str]) -> dict[str, float]:
    """One pass over ``order``: raise each parameter one grid step while the exact R fits."""
    theta = dict(theta)
    by = {p.name: p for p in prob.params}
    for name in order:
        nxt = by[name].step_up(theta[name])
        if nxt is None:
            continue
        trial = {**theta, name: nxt}
        if prob.ratio(trial) <= target:
            theta = trial
    return theta


def _finish(prob: _Problem, method: str, target: float, theta: dict[str, float], order: Sequence[str]) -> Allocation:
    smallest = prob.smallest()
    if prob.ratio(smallest) > target:
        r = prob.ratio(smallest)
        return Allocation(method, target, smallest, r, False)
    if prob.ratio(theta) > target:  # a coarse signal grid: fall back toward the smallest point
        theta = smallest
    theta = _top_up(prob, theta, target, order)
    return Allocation(method, target, theta, prob.ratio(theta), True)


# --------------------------------------------------------------------------- the allocators


def _uniform(prob: _Problem, target: float) -> Allocation:
    def family(s: float) -> dict[str, float]:
        return {p.name: p.snap(p.low + s * (1.0 - p.low)) for p in prob.params}

    theta = _bisect(prob, family, target)
    order = sorted((p.name for p in prob.params), key=lambda n: theta[n])  # lowest first: stay near uniform
    return _finish(prob, "uniform", target, theta, order)


def _energy_curve(p: _Param) -> tuple[list[float], list[float]] | None:
    sig = p.signals
    if not sig or not isinstance(sig.get("energy"), list) or len(sig["energy"]) != len(sig["grid"]):
        return None
    return [float(x) for x in sig["grid"]], [float(y) for y in sig["energy"]]


def _energy(prob: _Problem, target: float) -> Allocation | None:
    curves = {p.name: _energy_curve(p) for p in prob.params}
    if not any(curves.values()):
        return None

    def family(s: float) -> dict[str, float]:
        out = {}
        for p in prob.params:
            c = curves[p.name]
            # A layer without its curve keeps the fraction s itself (energy ~ theta).
            out[p.name] = p.snap(_inverse_increasing(*c, s) if c else p.low + s * (1.0 - p.low))
        return out

    theta = _bisect(prob, family, target)

    def kept_energy(n: str) -> float:
        c = curves[n]
        return _interp(*c, theta[n]) if c else theta[n]

    order = sorted(theta, key=kept_energy)  # the layer that keeps the least energy first
    return _finish(prob, "energy", target, theta, order)


def _lamp_curve(p: _Param) -> tuple[list[float], list[float]] | None:
    sig = p.signals
    if not sig or not isinstance(sig.get("lamp"), list) or len(sig["lamp"]) != len(sig["grid"]):
        return None
    return [float(x) for x in sig["grid"]], [float(y) for y in sig["lamp"]]


def _global(prob: _Problem, target: float) -> Allocation | None:
    curves = {p.name: _lamp_curve(p) for p in prob.params}
    if not any(curves.values()):
        return None
    tau_max = max((max(c[1]) for c in curves.values() if c), default=1.0)
    tau_max = max(tau_max, 1e-12) * (1.0 + 1e-9)

    def family(s: float) -> dict[str, float]:
        # s = 1 keeps everything (tau = 0); s = 0 removes everything a curve lets go (tau = max).
        tau = (1.0 - s) * tau_max
        out = {}
        for p in prob.params:
            c = curves[p.name]
            out[p.name] = p.snap(_first_below(*c, tau) if c else p.low + s * (1.0 - p.low))
        return out

    theta = _bisect(prob, family, target)

    def score_removed(n: str) -> float:
        c = curves[n]
        return _interp(*c, theta[n]) if c else 0.0

    order = sorted(theta, key=score_removed, reverse=True)  # the most important removed unit first
    return _finish(prob, "global", target, theta, order)


def _sens_curve(p: _Param) -> tuple[list[float], list[float]] | None:
    sig = p.signals
    if not sig:
        return None
    xs, ys = sig.get("sens_grid"), sig.get("sensitivity")
    if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) or not xs:
        return None
    pts = sorted(zip((float(x) for x in xs), (float(y) for y in ys)))
    if pts[-1][0] < 1.0 - 1e-9:
        pts.append((1.0, 0.0))  # dense: no loss
    return [x for x, _ in pts], [max(0.0, y) for _, y in pts]


# Cost bins of the knapsack's dynamic programme.
_DP_BINS = 1000


def _knapsack(prob: _Problem, target: float) -> Allocation | None:
    curves = {p.name: _sens_curve(p) for p in prob.params}
    if not all(curves.values()):
        return None  # a layer without its measured curve: no additive model of L to minimize
    dense = {p.name: p.snap(1.0) for p in prob.params}
    r_dense = prob.ratio(dense)
    # Each parameter's options: (theta, loss, the R it saves from the dense point).
    options: list[list[tuple[float, float, float]]] = []
    for p in prob.params:
        xs, ys = curves[p.name]  # type: ignore[misc]
        opts: dict[float, tuple[float, float, float]] = {}
        for x in list(xs) + [p.low]:
            th = p.snap(x)
            if th in opts:
                continue
            loss = _interp(xs, ys, th)
            save = r_dense - prob.ratio({**dense, p.name: th})
            opts[th] = (th, loss, max(0.0, save))
        options.append(sorted(opts.values()))

    def solve(need: float) -> dict[str, float] | None:
        """Least total loss saving at least ``need`` of R (additive savings, floored to bins)."""
        if need <= 0:
            return dict(dense)
        import numpy as np

        nb = _DP_BINS
        scale = nb / need
        best = np.full(nb + 1, np.inf)
        best[0] = 0.0  # best[b] = least loss saving >= b bins (b capped at nb)
        trace: list[tuple[np.ndarray, list[int], list[int]]] = []
        for opts in options:
            vals = np.full((len(opts), nb + 1), np.inf)
            shifts, tails = [], []
            for j, (_, loss, save) in enumerate(opts):
                sh = min(nb, int(math.floor(save * scale)))
                if sh > 0:
                    vals[j, sh:nb] = best[: nb - sh] + loss
                else:
                    vals[j, :nb] = best[:nb] + loss
                tail = int(np.argmin(best[nb - sh:])) + nb - sh  # every b >= nb - sh lands on nb
                vals[j, nb] = best[tail] + loss
                shifts.append(sh)
                tails.append(tail)
            arg = np.argmin(vals, axis=0)
            best = vals[arg, np.arange(nb + 1)]
            trace.append((arg, shifts, tails))
        if not np.isfinite(best[nb]):
            return None
        theta: dict[str, float] = {}
        b = nb
        for i in range(len(options) - 1, -1, -1):
            arg, shifts, tails = trace[i]
            j = int(arg[b])
            theta[prob.params[i].name] = options[i][j][0]
            b = tails[j] if b == nb else b - shifts[j]
        return theta

    # The savings are additive for per-layer methods and overestimated where channel groups share
    # a layer (a product of kept fractions saves less than the sum of its factors' savings): ask
    # for more saving, bisected, until the exact R fits.
    need = r_dense - target
    theta = solve(need)
    if theta is None or prob.ratio(theta) > target:
        lo, hi = need, sum(max(o[2] for o in opts) for opts in options) + 1e-9
        theta = None
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            th = solve(mid)
            if th is None:
                hi = mid
            elif prob.ratio(th) <= target:
                theta, hi = th, mid
            else:
                lo = mid
    if theta is None:
        theta = prob.smallest()

    def marginal(n: str) -> float:
        c = curves[n]
        return _interp(*c, theta[n]) if c else 0.0  # type: ignore[misc]

    order = sorted(theta, key=marginal, reverse=True)  # the most damaged layer first
    return _finish(prob, "knapsack", target, theta, order)


_FUNCS: dict[str, Callable[[_Problem, float], Allocation | None]] = {
    "uniform": _uniform, "energy": _energy, "global": _global, "knapsack": _knapsack,
}


# --------------------------------------------------------------------------- public functions


def available(profile: Any, space: Sequence[Mapping[str, Any]]) -> list[str]:
    """The allocators the profile has signals for (``uniform`` always), in :data:`ALLOCATORS` order."""
    prob = _Problem(profile, space, _cost_kind(profile))
    out = ["uniform"]
    if any(_energy_curve(p) for p in prob.params):
        out.append("energy")
    if any(_lamp_curve(p) for p in prob.params):
        out.append("global")
    if prob.params and all(_sens_curve(p) for p in prob.params):
        out.append("knapsack")
    return out


def _cost_kind(profile: Any) -> str:
    totals = _get(profile, "totals") or {}
    return "params" if "params" in totals else next(iter(totals), "params")


def allocate(method: str, profile: Any, space: Sequence[Mapping[str, Any]], target: float,
             cost: str = "params") -> Allocation | None:
    """One allocator's theta for a target R.

    Args:
        method: One of :data:`ALLOCATORS`.
        profile: The job's ProfileReport (dict or model).
        space: The job's SearchParam dicts (``name, low, high, size``).
        target: The largest allowed R.
        cost: The cost kind R is measured in.

    Returns:
        The allocation, or None when the profile lacks the signals ``method`` needs.
    """
    if method not in _FUNCS:
        raise ValueError(f"unknown allocator {method!r}; use one of {ALLOCATORS}")
    if not (target > 0):
        raise ValueError(f"the target R must be > 0, got {target}")
    return _FUNCS[method](_Problem(profile, space, cost), float(target))


def targets(objective: Mapping[str, Any]) -> list[float]:
    """The target R values of a job: its budget (``constrained``), else :data:`DEFAULT_TARGETS`."""
    if objective.get("kind") == "constrained" and objective.get("budget") is not None:
        return [float(objective["budget"])]
    return list(DEFAULT_TARGETS)


def allocations(profile: Any, space: Sequence[Mapping[str, Any]], objective: Mapping[str, Any],
                methods: Sequence[str] | None = None) -> list[Allocation]:
    """Every available allocator's point at each of the job's targets (targets outer, methods inner)."""
    cost = str(objective.get("cost") or "params")
    methods = list(methods) if methods is not None else available(profile, space)
    out = []
    for t in targets(objective):
        for m in methods:
            a = allocate(m, profile, space, t, cost)
            if a is not None:
                out.append(a)
    return out


def smallest_ratio(profile: Any, space: Sequence[Mapping[str, Any]], cost: str = "params") -> float:
    """The smallest R the space allows: every parameter at its lowest grid value."""
    prob = _Problem(profile, space, cost)
    return prob.ratio(prob.smallest())

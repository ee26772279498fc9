"""Benchmark tasks shared by the BO benchmarks: synthetic test functions and real compression.

Every task is a minimization problem over a box of named float parameters, with a fixed trial
budget. Two kinds:

- ``synthetic`` (Branin 2-d, Hartmann6, Ackley-10, and the ``rough`` suite of BoTorch test
  functions in 4-12 dims, :data:`ROUGH`): ``value(params)`` is the function value, noiseless; the
  score of a search is the best value found.
- ``compression`` (the zoo's trained ``digits-cnn``, Tucker-2 on its convolutions and SVD on its
  linear layers, 5 parameters): a trial measures the real relative distillation error L on the
  450 held-out digits (the formula of ``bocompress.worker.evaluate``) and the exact cost ratio R of the
  profile's cost forms. Task A (``scalarized``) scores J = L + R; task B (``constrained``)
  scores L subject to R <= 0.4 (the best *feasible* L). Measurements are cached by the kept
  counts of theta (what the compressed model depends on), so a benchmark pays for each distinct
  compressed model once per process.

A compression task's parameters are the profile's SearchParams (``name, low, high, size``):
bocompress sees the profile (and so knows R exactly); the baselines see a plain float box
``[low, high]`` and learn from the reported values alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from bocompress.costs import kept, ratio

#: The cost budget of the constrained compression task (largest allowed parameter ratio R).
CONSTRAINED_BUDGET = 0.4
#: The per-type method mix of the compression tasks.
METHOD_MIX = {"Conv2d": "tucker2", "Linear": "svd"}
#: Calibration samples (the whole held-out digits split).
N_CALIBRATION = 450

# (L, sem) by the kept counts of theta: both compression tasks measure the same compressed models.
_L_CACHE: dict[tuple[int, ...], tuple[float, float]] = {}


@dataclass
class Task:
    """One benchmark problem.

    Attributes:
        name: Short identifier (used in file names).
        title: Human-readable title.
        kind: ``synthetic``, ``scalarized`` or ``constrained``.
        params: Generic ParameterSpec dicts (``name, type, low, high``) for synthetic tasks;
            SearchParam dicts (``name, low, high, size``) for compression tasks.
        trials: The trial budget every method gets.
        optimum: The known (or best known) minimum of the score, for reference (None if unknown).
        fn: Synthetic tasks: params -> value.
        profile: Compression tasks: the ProfileReport dict (layers, cost forms, totals).
        budget: Constrained task: the largest allowed R.
    """

    name: str
    title: str
    kind: str
    params: list[dict]
    trials: int
    optimum: float | None = None
    fn: Callable[[dict[str, float]], float] | None = None
    profile: dict | None = None
    budget: float | None = None

    @property
    def compression(self) -> bool:
        """Whether the task measures a real compressed model."""
        return self.kind != "synthetic"

    @property
    def d(self) -> int:
        """The number of parameters."""
        return len(self.params)

    def bounds(self) -> list[tuple[str, float, float]]:
        """``(name, low, high)`` of each parameter, for the baselines."""
        return [(p["name"], float(p["low"]), float(p["high"])) for p in self.params]

    def measure(self, params: dict[str, float]) -> dict[str, float]:
        """Evaluate a point.

        Returns:
            Synthetic: ``{"value": f}``. Compression: ``{"L", "sem", "R", "J", "feasible"}`` with
            ``J`` = L + R (scalarized) or the penalized L (constrained: ``L`` when feasible, else
            ``1 + L + 10 * (R - budget)``, worse than any feasible L < 1).
        """
        if not self.compression:
            assert self.fn is not None
            return {"value": float(self.fn(params))}
        assert self.profile is not None
        theta = {p["name"]: float(params[p["name"]]) for p in self.params}
        key = tuple(kept(theta[p["name"]], int(p["size"])) for p in self.params)
        if key not in _L_CACHE:
            _L_CACHE[key] = _distill_l2(self.profile_key, theta)
        L, sem = _L_CACHE[key]
        R = float(ratio(self.profile, theta, "params"))
        out = {"L": L, "sem": sem, "R": R}
        if self.kind == "scalarized":
            out["J"] = L + R
            out["feasible"] = 1.0
        else:
            assert self.budget is not None
            ok = R <= self.budget + 1e-12
            out["feasible"] = 1.0 if ok else 0.0
            out["J"] = L if ok else 1.0 + L + 10.0 * (R - self.budget)
        return out

    def score(self, m: dict[str, float]) -> float:
        """The quality of one measurement (lower is better; ``inf`` for an infeasible trial)."""
        if not self.compression:
            return m["value"]
        if self.kind == "scalarized":
            return m["J"]
        return m["L"] if m["feasible"] else math.inf

    @property
    def profile_key(self) -> str:
        """The key of the compressor that measures this task (shared by both compression tasks)."""
        return "digits-cnn:tucker2+svd"


# --------------------------------------------------------------------------- synthetic functions


def branin(p: dict[str, float]) -> float:
    """Branin-Hoo on ``[-5, 10] x [0, 15]``; minimum 0.397887 (three minimizers)."""
    x1, x2 = p["x0"], p["x1"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_H6_ALPHA = [1.0, 1.2, 3.0, 3.2]
_H6_A = [
    [10, 3, 17, 3.5, 1.7, 8],
    [0.05, 10, 17, 0.1, 8, 14],
    [3, 3.5, 1.7, 10, 17, 8],
    [17, 8, 0.05, 10, 0.1, 14],
]
_H6_P = [
    [1312, 1696, 5569, 124, 8283, 5886],
    [2329, 4135, 8307, 3736, 1004, 9991],
    [2348, 1451, 3522, 2883, 3047, 6650],
    [4047, 8828, 8732, 5743, 1091, 381],
]


def hartmann6(p: dict[str, float]) -> float:
    """Hartmann-6 on ``[0, 1]^6``; minimum -3.32237."""
    x = [p[f"x{i}"] for i in range(6)]
    total = 0.0
    for a, arow, prow in zip(_H6_ALPHA, _H6_A, _H6_P):
        inner = sum(aj * (xj - pj * 1e-4) ** 2 for aj, xj, pj in zip(arow, x, prow))
        total += a * math.exp(-inner)
    return -total


def ackley(p: dict[str, float]) -> float:
    """Ackley (a=20, b=0.2, c=2 pi) in as many dims as ``p`` has; minimum 0 at the origin."""
    x = list(p.values())
    d = len(x)
    s1 = sum(v * v for v in x) / d
    s2 = sum(math.cos(2 * math.pi * v) for v in x) / d
    return -20.0 * math.exp(-0.2 * math.sqrt(s1)) - math.exp(s2) + 20.0 + math.e


def _box(d: int, low: float, high: float) -> list[dict]:
    return [{"name": f"x{i}", "type": "float", "low": low, "high": high, "log": False} for i in range(d)]


# --------------------------------------------------------------------------- the rough suite

#: The rough suite: (task name, BoTorch class, dims, shift the box?). Rough, multimodal, narrow
#: valleys, heavy tails: where a stationary GP on raw values struggles. Those whose optimum sits at
#: (or within a tenth of the width of) the centre of BoTorch's box get a shifted box
#: (:func:`shifted_box`); the others keep BoTorch's box.
ROUGH = (
    ("rosenbrock6", "Rosenbrock", 6, False),  # optimum (1, ..., 1) in [-5, 10]^6: 0.4 of the width
    ("levy10", "Levy", 10, True),  # (1, ..., 1) in [-10, 10]^10: 0.55, shifted
    ("styblinski8", "StyblinskiTang", 8, False),  # (-2.90, ...) in [-5, 5]^8: 0.21
    ("michalewicz5", "Michalewicz", 5, False),  # (2.20, 1.57, 1.28, 1.92, 1.72) in [0, pi]^5
    ("griewank8", "Griewank", 8, True),  # the origin in [-600, 600]^8: the centre, shifted
    ("rastrigin6", "Rastrigin", 6, True),  # the origin in [-5.12, 5.12]^6: the centre, shifted
    ("powell8", "Powell", 8, True),  # the origin in [-4, 5]^8: 0.44, shifted
    ("hartmann4", "Hartmann", 4, False),  # (0.19, 0.19, 0.56, 0.26) in [0, 1]^4
)
ROUGH_NAMES = tuple(r[0] for r in ROUGH)
#: The seed of the boxes' shifts (one per task, the same for every method and search seed).
SHIFT_SEED = 20261203
#: The trial budget of every rough task.
ROUGH_TRIALS = 40


def shifted_box(name: str, low: float, high: float, d: int) -> list[tuple[float, float]]:
    """BoTorch's box ``[low, high]^d`` translated, per dimension, by a seeded ``s_i``.

    ``|s_i|`` is drawn uniformly in ``[0.15, 0.35]`` of the width with a random sign (seeded by
    :data:`SHIFT_SEED` and the task's name), so the optimum, where it sat at the centre, sits at
    0.15-0.35 of the width from it, in a different corner for each task and still inside the box.
    The function is evaluated as BoTorch defines it (all of these are defined outside the box).
    """
    import random

    rng = random.Random(f"{SHIFT_SEED}:{name}")
    width = high - low
    out = []
    for _ in range(d):
        s = rng.uniform(0.15, 0.35) * width * rng.choice((-1.0, 1.0))
        out.append((low + s, high + s))
    return out


def botorch_fn(cls_name: str, d: int, shift: bool, name: str) -> tuple[Callable[[dict[str, float]], float], list[tuple[float, float]], float | None]:
    """``(params -> value, box, optimal value or None)`` of a BoTorch synthetic test function.

    With ``shift`` the box is :func:`shifted_box` of BoTorch's, passed as the function's ``bounds``
    (BoTorch checks that its optimizers lie inside them).
    """
    from botorch.test_functions import synthetic

    f0 = getattr(synthetic, cls_name)(dim=d, dtype=torch.float64)
    box = [(float(lo), float(hi)) for lo, hi in f0._bounds]
    if shift:
        box = shifted_box(name, box[0][0], box[0][1], d)
    f = getattr(synthetic, cls_name)(dim=d, dtype=torch.float64, bounds=box)

    def value(p: dict[str, float]) -> float:
        x = torch.tensor([[float(p[f"x{i}"]) for i in range(d)]], dtype=torch.float64)
        with torch.no_grad():
            return float(f.evaluate_true(x)[0])

    try:
        opt: float | None = float(f.optimal_value)
    except NotImplementedError:  # Hartmann-4: BoTorch gives none
        opt = None
    return value, box, opt


def rough_task(name: str) -> Task:
    """One task of the rough suite (:data:`ROUGH`)."""
    (row,) = [r for r in ROUGH if r[0] == name]
    _, cls_name, d, shift = row
    fn, box, opt = botorch_fn(cls_name, d, shift, name)
    title = f"{cls_name}-{d} (shifted box)" if shift else f"{cls_name}-{d}"
    params = [{"name": f"x{i}", "type": "float", "low": lo, "high": hi, "log": False} for i, (lo, hi) in enumerate(box)]
    return Task(name, title, "synthetic", params, trials=ROUGH_TRIALS, optimum=opt, fn=fn)


# --------------------------------------------------------------------------- compression


@lru_cache(maxsize=2)
def _compressor(key: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The compressor of the compression tasks, the calibration inputs and the teacher outputs."""
    from bocompress.worker.methods import build_compressor
    from bocompress.worker.zoo import load_data, load_model

    if key != "digits-cnn:tucker2+svd":
        raise ValueError(f"unknown compression task key {key!r}")
    model = load_model("digits-cnn")
    x, _ = load_data("digits", N_CALIBRATION)
    comp = build_compressor(model, METHOD_MIX, ["*"], 0.05, x[:8])
    with torch.no_grad():
        teacher = model(x).double()
    return comp, x, teacher


def _distill_l2(key: str, theta: dict[str, float]) -> tuple[float, float]:
    """Relative distillation error ``mean ||f~ - f*||^2 / mean ||f*||^2`` and its standard error."""
    comp, x, teacher = _compressor(key)
    with torch.no_grad():
        out = comp.apply(theta)(x).double()
    err = (out - teacher).pow(2).sum(1)
    denom = float(teacher.pow(2).sum(1).mean())
    return float(err.mean()) / denom, float(err.std()) / math.sqrt(len(err)) / denom


def compression_profile() -> dict:
    """The ProfileReport dict of the compression tasks (computed by the real worker method)."""
    comp, _, _ = _compressor("digits-cnn:tucker2+svd")
    return comp.profile()


# --------------------------------------------------------------------------- the task list


def make_tasks(names: list[str] | None = None) -> list[Task]:
    """The benchmark tasks (all of them, or those named), in a fixed order.

    Budgets: Branin 25 trials, Hartmann6 40, Ackley-10 40 (on ``[-5, 10]^10``, an asymmetric box,
    so the optimum is not at the centre), both compression tasks 30, every rough task 40.
    """
    wanted = set(names) if names else None
    out: list[Task] = []

    def want(n: str) -> bool:
        return wanted is None or n in wanted

    if want("branin"):
        out.append(Task("branin", "Branin (2-d)", "synthetic",
                        [{"name": "x0", "type": "float", "low": -5.0, "high": 10.0},
                         {"name": "x1", "type": "float", "low": 0.0, "high": 15.0}],
                        trials=25, optimum=0.397887, fn=branin))
    if want("hartmann6"):
        out.append(Task("hartmann6", "Hartmann6 (6-d)", "synthetic", _box(6, 0.0, 1.0), trials=40,
                        optimum=-3.32237, fn=hartmann6))
    if want("ackley10"):
        out.append(Task("ackley10", "Ackley-10 on [-5, 10]^10", "synthetic", _box(10, -5.0, 10.0), trials=40,
                        optimum=0.0, fn=ackley))
    if want("comp_scalarized") or want("comp_constrained"):
        prof = compression_profile()
        params = [dict(p) for p in prof["params"]]
        if want("comp_scalarized"):
            out.append(Task("comp_scalarized", "digits-cnn, Tucker-2 + SVD: min J = L + R", "scalarized", params,
                            trials=30, profile=prof))
        if want("comp_constrained"):
            out.append(Task("comp_constrained", f"digits-cnn, Tucker-2 + SVD: min L s.t. R <= {CONSTRAINED_BUDGET}",
                            "constrained", params, trials=30, profile=prof, budget=CONSTRAINED_BUDGET))
    for name in ROUGH_NAMES:
        if want(name):
            out.append(rough_task(name))
    return out


TASK_NAMES = ("branin", "hartmann6", "ackley10", "comp_scalarized", "comp_constrained")
#: Named subsets of the tasks (``bench/bo_quality.py --suite``).
SUITES = {
    "classic": TASK_NAMES,
    "rough": ROUGH_NAMES,
    "synthetic": ("branin", "hartmann6", "ackley10") + ROUGH_NAMES,
    "all": TASK_NAMES + ROUGH_NAMES,
}

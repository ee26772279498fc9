"""The generic engine's outcome transforms (chosen from the data) and the trust region's updates."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from bocompress.service.optimizer import Budgets, Observation, Problem
from bocompress.service.optimizer import propose as propose_uncapped
from bocompress.service.optimizer.acquisition import training_data
from bocompress.service.optimizer.candidates import TR_FAIL, TR_INIT, TR_MAX, TR_MIN, TR_SUCC, update_trust_region
from bocompress.service.optimizer.problem import compile_problem
from bocompress.service.optimizer.sobol import sobol_points
from bocompress.service.optimizer.synthetic import make_landscape
from bocompress.service.optimizer.transforms import LR_MIN, apply, choose, power_evidence, skewness

FAST = Budgets(fit_maxiter=15, num_restarts=2, raw_samples=64, maxiter=15, mc_samples=32)
propose = functools.partial(propose_uncapped, cap=FAST)

BOX = [{"name": f"x{i}", "type": "float", "low": -5.0, "high": 10.0, "log": False} for i in range(4)]


def _rosenbrock(p: dict[str, float]) -> float:
    x = [p[f"x{i}"] for i in range(4)]
    return sum(100.0 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(3))


def _sphere(p: dict[str, float]) -> float:
    return sum((p[f"x{i}"] - 2.0) ** 2 for i in range(4))


def _ridge(p: dict[str, float]) -> float:
    """Nearly Gaussian values over the box (a sum of bounded terms): nothing to transform."""
    return sum(math.sin(0.4 * p[f"x{i}"]) + 0.1 * p[f"x{i}"] for i in range(4))


def _history(fn, n: int = 16) -> list[Observation]:
    pts = (-5.0 + 15.0 * sobol_points(4, 11, 0, n)).tolist()
    return [Observation({f"x{i}": v for i, v in enumerate(row)}, fn({f"x{i}": v for i, v in enumerate(row)}), 0.0)
            for row in pts]


def _problem(**options) -> Problem:
    return Problem(BOX, {"metric": "y", "direction": "minimize"}, None, 8, 0, options=options or None)


def test_a_heavy_tailed_metric_gets_a_power_transform_and_a_light_one_none() -> None:
    heavy = torch.tensor([o.value for o in _history(_rosenbrock)], dtype=torch.float64)
    light = torch.tensor([o.value for o in _history(_ridge)], dtype=torch.float64)
    assert power_evidence(heavy) >= LR_MIN > power_evidence(light)
    assert skewness(heavy) > 1.0
    # Y is larger-is-better: the minimized metric negated.
    assert choose(-heavy, "auto") == "power"
    assert choose(-light, "auto") == "none"
    assert choose(-heavy[:4], "auto") == "none"  # too few points to tell
    # A long *good* tail (a few deep minima, as Hartmann's) is information, not an outlier: no transform.
    assert choose(heavy, "auto") == "none"
    # A squared distance (a chi-square-like right tail) is transformed too, toward the distance.
    sphere = torch.tensor([o.value for o in _history(_sphere)], dtype=torch.float64)
    assert choose(-sphere, "auto") == "power"
    assert choose(-light, "rank") == "rank"
    with pytest.raises(ValueError, match="transform"):
        choose(-light, "boxcox")


@pytest.mark.parametrize("name", ["power", "log", "rank"])
def test_transforms_keep_the_order_and_tame_the_tail(name: str) -> None:
    f = torch.tensor([o.value for o in _history(_rosenbrock)], dtype=torch.float64)
    z, slope = apply(name, -f)
    assert torch.isfinite(z).all()
    # Monotone: the best point stays the best, the order is the same.
    assert torch.equal(torch.argsort(z, descending=True, stable=True), torch.argsort(f, stable=True))
    if name == "log":
        # Five decades of Rosenbrock's values in a span of a few units.
        assert float(z.max() - z.min()) < 20.0
    else:
        assert abs(skewness(-z)) < 0.5 * skewness(f)
    if name == "rank":
        assert slope is None
        return
    assert slope is not None and bool((slope > 0).all())
    if name == "log":
        # dz/dY by a finite difference at a point the offset does not depend on (the best two set it).
        i = int(torch.argsort(f)[13])
        h = 1e-6 * abs(float(f[i]))
        g = f.clone()
        g[i] = g[i] - h  # Y = -f grows by h
        z2, _ = apply(name, -g)
        assert math.isclose(float(z2[i] - z[i]) / h, float(slope[i]), rel_tol=1e-3)


def test_training_data_models_the_transformed_metric_and_ranks_by_the_raw_one() -> None:
    obs = _history(_rosenbrock)
    ctx = compile_problem(_problem())
    _, Y, _, J = training_data(ctx, obs)
    raw = torch.tensor([o.value for o in obs], dtype=torch.float64)
    assert torch.equal(J, raw)  # incumbents by the metric as reported
    assert float(Y.max() - Y.min()) < 0.01 * float(raw.max() - raw.min())
    _, Y_none, _, _ = training_data(compile_problem(_problem(transform="none")), obs)
    # The winsorized raw values: only the bad tail clipped.
    assert float(Y_none.max()) == float(-raw.min())


def test_a_well_behaved_metric_is_proposed_for_exactly_as_before() -> None:
    obs = _history(_ridge, 10)
    auto, _ = propose(_problem(), obs, [], 10, 2)
    none, _ = propose(_problem(transform="none"), obs, [], 10, 2)
    assert auto == none
    heavy = _history(_rosenbrock, 16)
    a, _ = propose(_problem(), heavy, [], 16, 1)
    b, _ = propose(_problem(transform="none"), heavy, [], 16, 1)
    assert a != b


def test_compression_problems_take_no_transform() -> None:
    ls = make_landscape(d=4, seed=0)
    obj = {"kind": "scalarized", "kappa": 1.0, "cost": "params"}
    assert compile_problem(Problem(ls.params, obj, ls.profile, 4, 0)).transform == "none"
    with pytest.raises(ValueError, match="generic jobs"):
        compile_problem(Problem(ls.params, obj, ls.profile, 4, 0, options={"transform": "power"}))
    with pytest.raises(ValueError, match="unknown transform"):
        compile_problem(_problem(transform="boxcox"))


def test_trust_region_expands_on_successes_and_shrinks_on_failures() -> None:
    ctx = compile_problem(_problem(trust_region=True))
    tr = update_trust_region(ctx, torch.tensor([5.0, 4.0]), None)  # the initial design sets the incumbent
    assert tr["length"] == TR_INIT and tr["best"] == 4.0 and tr["seen"] == 2
    # TR_SUCC improvements in a row double the side.
    better = torch.tensor([5.0, 4.0] + [3.0 - i for i in range(TR_SUCC)])
    tr = update_trust_region(ctx, better, tr)
    assert tr["length"] == 2 * TR_INIT and tr["best"] == 3.0 - (TR_SUCC - 1)
    # TR_FAIL trials without one halve it.
    worse = torch.cat([better, torch.full((TR_FAIL,), 9.0)])
    tr = update_trust_region(ctx, worse, tr)
    assert tr["length"] == TR_INIT and tr["fail"] == 0
    # It never exceeds TR_MAX; below TR_MIN it restarts at TR_INIT.
    J = worse
    for _ in range(20):
        J = torch.cat([J, torch.tensor([float(J.min()) - 1.0])])
        tr = update_trust_region(ctx, J, tr)
        assert tr["length"] <= TR_MAX
    assert tr["length"] == TR_MAX
    lengths = []
    for _ in range(60):
        J = torch.cat([J, torch.tensor([1e9])])
        tr = update_trust_region(ctx, J, tr)
        lengths.append(tr["length"])
    assert min(lengths) >= TR_MIN and TR_INIT in lengths[10:]

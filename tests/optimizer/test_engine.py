"""propose(): reproducibility, duplicates, feasibility, the GP stage's worth, and scale."""

from __future__ import annotations

import functools
import math
import statistics
import time

import pytest
import torch

from bocompress import costs
from bocompress.service.optimizer import Budgets, Observation, Problem, point_key
from bocompress.service.optimizer import propose as propose_uncapped
from bocompress.service.optimizer.sobol import sobol_points
from bocompress.service.optimizer.space import Space
from bocompress.service.optimizer.synthetic import make_landscape, sobol_history


# Every call here caps the GP stage's budgets to a few iterations (as BoTorch's ``mock_optimize``),
# through ``propose``'s explicit ``cap``; the scale test calls ``propose_uncapped``, with the
# production budgets.
FAST = Budgets(fit_maxiter=15, num_restarts=2, raw_samples=64, maxiter=15, mc_samples=32)
propose = functools.partial(propose_uncapped, cap=FAST)


MIXED = [
    {"name": "x", "type": "float", "low": -2.0, "high": 3.0, "log": False},
    {"name": "lr", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    {"name": "layers", "type": "int", "low": 1, "high": 6, "log": False},
    {"name": "width", "type": "int", "low": 8, "high": 512, "log": True},
]


def _mixed_value(p: dict[str, float]) -> float:
    return (p["x"] - 0.5) ** 2 + (math.log10(p["lr"]) + 3) ** 2 + 0.3 * abs(p["layers"] - 3) + 0.1 * math.log2(p["width"])


def _generic(params: list[dict], n_initial: int = 4, seed: int = 0, engine: str = "auto", direction: str = "minimize") -> Problem:
    return Problem(params=params, objective={"metric": "y", "direction": direction}, profile=None,
                   n_initial=n_initial, seed=seed, engine=engine)


def _check_types(points: list[dict[str, float]]) -> None:
    for p in points:
        assert -2.0 <= p["x"] <= 3.0
        assert 1e-5 <= p["lr"] <= 1e-1
        assert p["layers"] == int(p["layers"]) and 1 <= p["layers"] <= 6
        assert p["width"] == int(p["width"]) and 8 <= p["width"] <= 512


def test_sobol_stage_is_reproducible_and_indexed_by_trial() -> None:
    prob = _generic(MIXED, n_initial=8, seed=7)
    a, _ = propose(prob, [], [], 0, 5)
    b, _ = propose(prob, [], [], 0, 5)
    assert a == b
    _check_types(a)
    head, _ = propose(prob, [], [], 0, 2)
    tail, _ = propose(prob, [], head, 2, 3)
    assert head + tail == a
    other, _ = propose(_generic(MIXED, n_initial=8, seed=8), [], [], 0, 5)
    assert other != a
    # Keys the caller kept give the same points as keys the engine computes.
    key = point_key(prob)
    obs = [Observation(p, float(i)) for i, p in enumerate(a[:3])]
    assert propose(prob, obs, a[3:], 5, 4) == propose(prob, obs, a[3:], 5, 4,
                                                      keys=([key(o.params) for o in obs], [key(p) for p in a[3:]]))
    # The i-th point is the i-th scrambled Sobol point, mapped to the space.
    sp = Space(MIXED, compression=False)
    assert a[3] == sp.from_unit(sobol_points(4, 7, 3, 1)[0].tolist())
    # A generic job's trial 0 is the centre of the space (Ax's default); ``center=False`` restores
    # Sobol point 0.
    assert a[0] == sp.from_unit([0.5] * 4)
    off = Problem(MIXED, {"metric": "y", "direction": "minimize"}, None, 8, 7, options={"center": False})
    assert propose(off, [], [], 0, 1)[0][0] == sp.from_unit(sobol_points(4, 7, 0, 1)[0].tolist())


def test_winsorize_clips_only_the_bad_tail() -> None:
    from bocompress.service.optimizer.acquisition import winsorize_low as _winsorize_low

    # Larger is better: the one very bad value is raised to the lower Tukey fence, the rest stay.
    y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, -500.0], dtype=torch.float64)
    w = _winsorize_low(y)
    assert torch.equal(w[:-1], y[:-1])
    assert -500.0 < float(w[-1]) < 1.0
    # Nothing to clip: unchanged.
    assert torch.equal(_winsorize_low(y[:-1]), y[:-1])


def test_gp_stage_is_reproducible_with_state() -> None:
    prob = _generic(MIXED, n_initial=6, seed=1)
    pts, _ = propose(prob, [], [], 0, 6)
    obs = [Observation(p, _mixed_value(p), 0.01) for p in pts]
    pending, _ = propose(prob, obs, [], 6, 1)
    a, sa = propose(prob, obs, pending, 7, 3, {"other": 1})
    b, sb = propose(prob, obs, pending, 7, 3, {"other": 1})
    assert a == b and sa == sb
    assert sa["other"] == 1 and "gp" in sa
    _check_types(a)
    # Warm-started from the returned state: still reproducible and JSON-serializable.
    import json

    c, sc = propose(prob, obs, pending, 7, 3, json.loads(json.dumps(sa)))
    d, _ = propose(prob, obs, pending, 7, 3, json.loads(json.dumps(sa)))
    assert c == d


@pytest.mark.parametrize("engine", ["sobol", "gp"])
def test_never_duplicates_pending_or_observed(engine: str) -> None:
    params = [{"name": "a", "type": "int", "low": 0, "high": 2}, {"name": "b", "type": "int", "low": 0, "high": 1}]
    prob = _generic(params, n_initial=2, engine=engine)
    everything = [{"a": float(a), "b": float(b)} for a in range(3) for b in range(2)]
    obs = [Observation(p, p["a"] + p["b"]) for p in everything[:2]]
    pending = everything[2:4]
    pts, _ = propose(prob, obs, pending, 4, 2)
    keys = {(p["a"], p["b"]) for p in pts}
    assert len(keys) == 2
    assert keys == {(2.0, 0.0), (2.0, 1.0)}
    # Nothing left: fewer points than asked, never a duplicate.
    more, _ = propose(prob, obs, pending + pts, 6, 3)
    assert more == []


def test_batch_points_are_distinct_on_continuous_and_grid_spaces() -> None:
    ls = make_landscape(d=3, seed=0)
    for kind in ("scalarized", "pareto"):
        prob = Problem(ls.params, {"kind": kind, "kappa": 1.0, "cost": "params"}, ls.profile, 4, 0)
        init, _ = propose(prob, [], [], 0, 4)
        g = torch.Generator().manual_seed(0)
        obs = [Observation(p, *ls.measure(p, g)) for p in init]
        pts, _ = propose(prob, obs, [], 4, 4)
        sp = Space(ls.params, compression=True)
        keys = [sp.key(p) for p in pts] + [sp.key(o.params) for o in obs]
        assert len(pts) == 4 and len(set(keys)) == len(keys)
        for p in pts:
            for spec in ls.params:
                k = round(p[spec["name"]] * spec["size"])
                assert p[spec["name"]] == k / spec["size"]
                assert spec["low"] <= p[spec["name"]] <= spec["high"]


def _run_constrained(ls, budget: float, n_rounds: int, batch: int, seed: int) -> list[dict[str, float]]:
    prob = Problem(ls.params, {"kind": "constrained", "budget": budget, "cost": "params"}, ls.profile, 6, seed)
    g = torch.Generator().manual_seed(seed)
    obs: list[Observation] = []
    proposed: list[dict[str, float]] = []
    state = None
    for r in range(n_rounds):
        pts, state = propose(prob, obs, [], len(proposed), batch, state)
        proposed += pts
        obs += [Observation(p, *ls.measure(p, g)) for p in pts]
    return proposed


def test_constrained_never_proposes_over_budget() -> None:
    ls = make_landscape(d=6, seed=2)
    budget = 0.25
    # 2 Sobol rounds of 3, then 3 GP rounds of 3 (pending = earlier points of the batch).
    proposed = _run_constrained(ls, budget, n_rounds=5, batch=3, seed=0)
    assert len(proposed) == 15
    rs = [costs.ratio(ls.profile, p, "params") for p in proposed]
    assert max(rs) <= budget
    # The repair keeps points near the budget rather than collapsing them to all-low.
    assert statistics.median(rs) > 0.5 * budget


def test_constrained_with_infeasible_floor_proposes_all_low_once() -> None:
    ls = make_landscape(d=4, seed=2)
    low = {p["name"]: p["low"] for p in ls.params}
    r_low = costs.ratio(ls.profile, low, "params")
    prob = Problem(ls.params, {"kind": "constrained", "budget": r_low / 2, "cost": "params"}, ls.profile, 4, 0)
    pts, _ = propose(prob, [], [], 0, 3)
    sp = Space(ls.params, compression=True)
    assert [sp.key(p) for p in pts] == [sp.key(low)]


def _branin(x1: float, x2: float) -> float:
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def _best_branin(engine: str, seed: int, trials: int = 25, cap: Budgets = FAST) -> float:
    params = [{"name": "x1", "type": "float", "low": -5.0, "high": 10.0}, {"name": "x2", "type": "float", "low": 0.0, "high": 15.0}]
    prob = _generic(params, n_initial=6, seed=seed, engine=engine)
    obs: list[Observation] = []
    state = None
    for i in range(trials):
        (p,), state = propose_uncapped(prob, obs, [], i, 1, state, cap=cap)
        obs.append(Observation(p, _branin(p["x1"], p["x2"])))
    return min(o.value for o in obs)


def test_gp_beats_sobol_on_branin() -> None:
    # A quality check: small but not FAST's 15-iteration caps, under which the result hangs on
    # library versions (seeds 1-3 ended at 0.9-1.0 with botorch 0.18.1).
    cap = Budgets(fit_maxiter=30, num_restarts=4, raw_samples=128, maxiter=30, mc_samples=64)
    gp = statistics.median(_best_branin("auto", s, cap=cap) for s in range(3))
    sobol = statistics.median(_best_branin("sobol", s) for s in range(3))
    assert gp < sobol
    assert gp < 0.397887 + 0.5  # near the global minimum


def test_maximize_direction_is_respected() -> None:
    params = [{"name": "x", "type": "float", "low": 0.0, "high": 1.0}]
    prob = _generic(params, n_initial=4, direction="maximize")
    obs = [Observation({"x": x}, -((x - 0.8) ** 2)) for x in (0.1, 0.3, 0.5, 0.7, 0.95)]
    pts, _ = propose(prob, obs, [], 5, 1)
    assert abs(pts[0]["x"] - 0.8) < 0.15


def test_pareto_returns_points_on_both_ends() -> None:
    ls = make_landscape(d=4, seed=5)
    prob = Problem(ls.params, {"kind": "pareto", "kappa": 1.0, "cost": "params"}, ls.profile, 6, 0)
    g = torch.Generator().manual_seed(0)
    init, _ = propose(prob, [], [], 0, 6)
    obs = [Observation(p, *ls.measure(p, g)) for p in init]
    pts, state = propose(prob, obs, [], 6, 3)
    assert len(pts) == 3 and "gp" in state
    sp = Space(ls.params, compression=True)
    assert len({sp.key(p) for p in pts + init}) == 9
    # Both ends of the front: one proposal in the low half of the initial design's R range, and
    # another (a different point) in the low half of its L range. A scalarized acquisition would
    # put the whole batch at one trade-off instead.
    r_init = [costs.ratio(ls.profile, p, "params") for p in init]
    l_init = [ls.true_l(p) for p in init]
    r_mid = (min(r_init) + max(r_init)) / 2
    l_mid = (min(l_init) + max(l_init)) / 2
    low_r = [i for i, p in enumerate(pts) if costs.ratio(ls.profile, p, "params") < r_mid]
    low_l = [i for i, p in enumerate(pts) if ls.true_l(p) < l_mid]
    assert low_r and low_l, (low_r, low_l)
    assert any(i != j for i in low_r for j in low_l)


def test_scale_1000_observations_64_dims() -> None:
    d, n = 64, 1000
    ls = make_landscape(d=d, seed=0)
    sp = Space(ls.params, compression=True)
    obs = sobol_history(ls, n)
    prob = Problem(ls.params, {"kind": "scalarized", "kappa": 1.0, "cost": "params"}, ls.profile, 8, 0)
    pending = [sp.from_unit(u) for u in sobol_points(d, 4, 0, 8).tolist()]
    # The production budgets (no cap): this measures what the service runs.
    t0 = time.perf_counter()
    pts, state = propose_uncapped(prob, obs, pending, n + 8, 2)
    elapsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    pts2, _ = propose_uncapped(prob, obs, pending, n + 8, 2, state)
    warm = time.perf_counter() - t0
    assert len(pts) == 2 and len(pts2) == 2
    # Generous: the shared 2-core CI host may be busy (bench/bo_latency.py measures the real numbers).
    assert elapsed < 60.0 and warm < 60.0, (elapsed, warm)


def test_bad_problems_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="engine"):
        propose(_generic(MIXED, engine="random"), [], [], 0, 1)
    ls = make_landscape(d=2, seed=0)
    with pytest.raises(ValueError, match="profile"):
        propose(Problem(ls.params, {"kind": "scalarized"}, None, 2, 0), [], [], 0, 1)
    with pytest.raises(ValueError, match="budget"):
        propose(Problem(ls.params, {"kind": "constrained"}, ls.profile, 2, 0), [], [], 0, 1)
    with pytest.raises(ValueError, match="n must be"):
        propose(_generic(MIXED), [], [], 0, -1)


def test_compression_gp_models_log_l_with_a_linear_trend() -> None:
    ls = make_landscape(d=4, seed=1)
    prob = Problem(ls.params, {"kind": "scalarized", "kappa": 1.0, "cost": "params"}, ls.profile, 4, 0)
    g = torch.Generator().manual_seed(0)
    init, _ = propose(prob, [], [], 0, 6)
    obs = [Observation(p, *ls.measure(p, g)) for p in init]
    _, state = propose(prob, obs, [], 6, 1)
    assert state["gp"]["signature"].endswith(":linear")
    # Generic jobs keep the constant mean; an unknown mean is refused.
    gen = _generic(MIXED, n_initial=4)
    pts, _ = propose(gen, [], [], 0, 5)
    _, gstate = propose(gen, [Observation(p, _mixed_value(p)) for p in pts], [], 5, 1)
    assert gstate["gp"]["signature"].endswith(":constant")
    with pytest.raises(ValueError, match="mean"):
        propose(Problem(ls.params, prob.objective, ls.profile, 4, 0, options={"mean": "cubic"}), obs, [], 6, 1)


def test_sobol_goes_on_until_half_the_initial_design_is_back() -> None:
    """Parallel workers: with 3 of 8 initial trials observed, the next points stay on the Sobol sequence."""
    ls = make_landscape(d=4, seed=1)
    prob = Problem(ls.params, {"kind": "scalarized", "kappa": 1.0, "cost": "params"}, ls.profile, 8, 0)
    g = torch.Generator().manual_seed(0)
    init, _ = propose(prob, [], [], 0, 8)
    obs = [Observation(p, *ls.measure(p, g)) for p in init[:3]]
    nxt, state = propose(prob, obs, init[3:], 8, 2)
    sp = Space(ls.params, compression=True)
    assert nxt == [sp.from_unit(u) for u in sobol_points(4, 0, 8, 2).tolist()]
    assert "gp" not in state
    obs += [Observation(p, *ls.measure(p, g)) for p in init[3:4]]
    _, state = propose(prob, obs, init[4:], 8, 1)
    assert "gp" in state


def test_scalarized_gp_stage_finds_a_better_j_than_its_sobol_stage() -> None:
    """Sequential search on a 6-layer landscape: the composite GP improves on the initial design."""
    ls = make_landscape(d=6, seed=3)
    prob = Problem(ls.params, {"kind": "scalarized", "kappa": 1.0, "cost": "params"}, ls.profile, 8, 0)
    g = torch.Generator().manual_seed(0)
    obs: list[Observation] = []
    js: list[float] = []
    state = None
    for i in range(16):
        (p,), state = propose(prob, obs, [], i, 1, state)
        obs.append(Observation(p, *ls.measure(p, g)))
        js.append(ls.true_l(p) + costs.ratio(ls.profile, p, "params"))
    assert min(js[8:]) < min(js[:8])


def test_auto_compression_jobs_start_with_the_allocators_and_allocator_engines_stop() -> None:
    from bocompress.service.optimizer.allocators import allocate

    ls = make_landscape(d=6, seed=2)
    budget = 0.3
    obj = {"kind": "constrained", "budget": budget, "cost": "params"}
    uni = allocate("uniform", ls.profile, ls.params, budget)
    assert uni is not None
    first, _ = propose(Problem(ls.params, obj, ls.profile, 4, 0), [], [], 0, 2)
    assert first[0] == uni.theta  # the profile has no signals: uniform is the only allocator
    one, _ = propose(Problem(ls.params, obj, ls.profile, 4, 0, engine="uniform"), [], [], 0, 3)
    assert one == [uni.theta]
    none, _ = propose(Problem(ls.params, obj, ls.profile, 4, 0, engine="uniform"), [], [uni.theta], 1, 3)
    assert none == []
    sc, _ = propose(Problem(ls.params, {"kind": "scalarized", "cost": "params"}, ls.profile, 4, 0, engine="uniform"),
                    [], [], 0, 5)
    assert [round(costs.ratio(ls.profile, p, "params"), 2) <= t for p, t in zip(sc, (0.25, 0.5, 0.75))] == [True] * 3


def test_trust_region_stays_feasible_and_adapts() -> None:
    ls = make_landscape(d=10, seed=4)
    budget = 0.3
    prob = Problem(ls.params, {"kind": "constrained", "budget": budget, "cost": "params"}, ls.profile, 4, 0,
                   options={"trust_region": True})
    g = torch.Generator().manual_seed(0)
    obs: list[Observation] = []
    state = None
    lengths = []
    for i in range(12):
        (p,), state = propose(prob, obs, [], i, 1, state)
        assert costs.ratio(ls.profile, p, "params") <= budget
        obs.append(Observation(p, *ls.measure(p, g)))
        if state.get("gp", {}).get("tr"):
            lengths.append(state["gp"]["tr"]["length"])
    assert lengths and len(set(lengths)) >= 1 and all(0.0 < v <= 1.6 for v in lengths)

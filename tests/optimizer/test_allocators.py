"""One-shot allocators: exact target R, graceful without signals, knapsack beats uniform."""

from __future__ import annotations

import copy
import math

import pytest

from bocompress import costs
from bocompress.service.optimizer.allocators import ALLOCATORS, allocate, allocations, available, smallest_ratio
from bocompress.service.optimizer.synthetic import Landscape, make_landscape


def _with_signals(ls: Landscape, sensitivity: bool = True) -> dict:
    """The landscape's profile with the signals a worker would measure: a spectrum per layer
    (energy and LAMP curves from it) and the additive part of L as the sensitivity curve."""
    prof = copy.deepcopy(ls.profile)
    for i, (layer, sp) in enumerate(zip(prof["layers"], ls.params)):
        size = int(sp["size"])
        sv2 = [math.exp(-(j + 1) * (0.02 + 0.1 * ((i * 7) % 5))) for j in range(size)]  # descending sigma^2
        total = sum(sv2)
        grid = [min(1.0, max(sp["low"], k / 32)) for k in range(1, 33)]
        grid = sorted(set(grid)) + ([1.0] if grid[-1] < 1.0 else [])
        energy, lamp = [], []
        for t in grid:
            r = costs.kept(t, size)
            energy.append(sum(sv2[:r]) / total)
            # LAMP score of the most important removed unit: v / sum of those at least as large.
            if r >= size:
                lamp.append(0.0)
            else:
                asc = sorted(sv2)
                v = sv2[r]  # the largest removed
                lamp.append(v / sum(x for x in asc if x >= v))
        energy[-1] = 1.0
        sig = {"grid": grid, "energy": energy, "lamp": lamp}
        if sensitivity:
            sg = [0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0]
            sig["sens_grid"] = sg
            sig["sensitivity"] = [ls.a[i] * (1.0 - costs.kept(t, size) / size) ** ls.p[i] for t in sg]
        layer["signals"] = sig
    return prof


@pytest.mark.parametrize("method", ALLOCATORS)
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_each_allocator_hits_the_target_exactly(method: str, target: float) -> None:
    ls = make_landscape(d=12, seed=3)
    prof = _with_signals(ls)
    a = allocate(method, prof, ls.params, target)
    assert a is not None and a.feasible
    r = costs.ratio(prof, a.theta, "params")
    assert r == a.ratio and r <= target
    # It uses the budget up to grid rounding: no single parameter can go one step up and still fit.
    for sp in ls.params:
        size = int(sp["size"])
        k = costs.kept(a.theta[sp["name"]], size)
        assert a.theta[sp["name"]] == k / size and sp["low"] - 1e-12 <= a.theta[sp["name"]] <= sp["high"] + 1e-12
    assert target - r < 0.05


def test_uniform_works_without_signals_and_others_degrade() -> None:
    ls = make_landscape(d=6, seed=1)
    assert available(ls.profile, ls.params) == ["uniform"]
    assert allocate("energy", ls.profile, ls.params, 0.5) is None
    assert allocate("knapsack", ls.profile, ls.params, 0.5) is None
    pts = allocations(ls.profile, ls.params, {"kind": "scalarized"})
    assert [p.method for p in pts] == ["uniform"] * 3 and [p.target for p in pts] == [0.25, 0.5, 0.75]
    u = pts[1].theta
    assert len({round(v, 1) for v in u.values()}) <= 3  # one theta up to each layer's grid and range
    prof = _with_signals(ls, sensitivity=False)
    assert available(prof, ls.params) == ["uniform", "energy", "global"]
    assert available(_with_signals(ls), ls.params) == list(ALLOCATORS)


def test_knapsack_beats_uniform_on_an_additive_profile() -> None:
    wins = 0
    for seed in range(4):
        ls = make_landscape(d=10, seed=seed)
        ls = Landscape(ls.profile, ls.params, ls.a, ls.p, [0.0] * len(ls.c), 0.0, 0.0)  # purely additive
        prof = _with_signals(ls)
        u = allocate("uniform", prof, ls.params, 0.4)
        k = allocate("knapsack", prof, ls.params, 0.4)
        assert u is not None and k is not None and k.ratio <= 0.4
        wins += ls.true_l(k.theta) < ls.true_l(u.theta)
    assert wins == 4


def test_an_unreachable_target_gives_the_smallest_point() -> None:
    ls = make_landscape(d=5, seed=0)
    r_min = smallest_ratio(ls.profile, ls.params)
    a = allocate("uniform", ls.profile, ls.params, r_min / 2)
    assert a is not None and not a.feasible and a.ratio == pytest.approx(r_min)


def _chain_profile(d: int = 6) -> tuple[dict, list[dict], list[float]]:
    """Channel pruning of a chain of convs: layer i costs c_i * keep(g_{i-1}) * keep(g_i) (coupled groups)."""
    layers, params, weights = [], [], []
    total = 0.0
    for i in range(d):
        name, size = f"conv{i}", 16 * (1 + i % 3)
        params.append({"name": name, "low": 0.05, "high": 1.0, "size": size})
        factors = [{"param": name, "size": size}]
        prev = params[i - 1] if i else None
        cin = prev["size"] if prev else 3
        if prev:
            factors.append({"param": prev["name"], "size": prev["size"]})
        coef = 9.0 * (1 if prev else cin)
        dense = coef * size * (prev["size"] if prev else 1)
        total += dense
        weights.append(0.05 + 0.1 * ((i * 5) % 4))
        sg = [0.1, 0.3, 0.55, 0.8]
        layers.append({"name": name, "type": "Conv2d", "method": "channel_l1", "shape": [size, cin, 3, 3],
                       "params": [p["name"] for p in ([prev] if prev else [])] + [name],
                       "costs": {"params": {"terms": [{"coef": coef, "factors": factors}], "cap": None}},
                       "dense": {"params": dense},
                       "signals": {"grid": [0.05, 1.0], "energy": [0.0, 1.0], "lamp": [1.0, 0.0], "sens_grid": sg,
                                   "sensitivity": [weights[-1] * (1 - t) ** 2 for t in sg]}})
    return {"layers": layers, "params": params, "totals": {"params": total * 1.02}}, params, weights


def test_knapsack_fits_coupled_channel_costs() -> None:
    prof, params, w = _chain_profile()

    def loss(theta: dict) -> float:
        return sum(wi * (1 - theta[p["name"]]) ** 2 for wi, p in zip(w, params))

    for target in (0.25, 0.5):
        k = allocate("knapsack", prof, params, target)
        u = allocate("uniform", prof, params, target)
        assert k is not None and u is not None and k.feasible
        assert costs.ratio(prof, k.theta, "params") <= target and target - k.ratio < 0.05
        assert loss(k.theta) <= loss(u.theta) + 1e-9

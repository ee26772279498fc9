"""The search space encoding and the exact/relaxed cost model."""

from __future__ import annotations

import math

import pytest
import torch

from bocompress import costs
from bocompress.costs import kept
from bocompress.service.optimizer import CostModel, Observation, Problem, Space, propose, ratio
from bocompress.service.optimizer.synthetic import make_landscape


def test_int_params_cover_every_value_evenly() -> None:
    sp = Space([{"name": "k", "type": "int", "low": 2, "high": 5}], compression=False)
    grid = torch.linspace(0, 1, 4001).tolist()
    counts: dict[float, int] = {}
    for u in grid:
        v = sp.from_unit([u])["k"]
        counts[v] = counts.get(v, 0) + 1
    assert sorted(counts) == [2.0, 3.0, 4.0, 5.0]
    assert max(counts.values()) - min(counts.values()) <= 2
    for v in (2.0, 3.0, 4.0, 5.0):
        assert sp.from_unit(sp.to_unit({"k": v}))["k"] == v


def test_log_params_are_uniform_in_log_space() -> None:
    sp = Space([{"name": "lr", "type": "float", "low": 1e-4, "high": 1.0, "log": True}], compression=False)
    assert sp.from_unit([0.5])["lr"] == pytest.approx(1e-2)
    assert sp.to_unit({"lr": 1e-3}) == [pytest.approx(0.25)]
    spi = Space([{"name": "n", "type": "int", "low": 1, "high": 1000, "log": True}], compression=False)
    vals = [spi.from_unit([u])["n"] for u in torch.linspace(0, 1, 101).tolist()]
    assert all(v == int(v) and 1 <= v <= 1000 for v in vals)
    assert sum(v < 32 for v in vals) > 30  # half the log range lies below sqrt(1000)


def test_grid_params_snap_to_kept_counts() -> None:
    sp = Space([{"name": "t", "low": 0.05, "high": 0.8, "size": 7}], compression=True)
    for u in torch.linspace(0, 1, 301).tolist():
        theta = sp.from_unit([u])["t"]
        k = round(theta * 7)
        assert theta == k / 7
        assert kept(theta, 7) == k
        assert 0.05 <= theta <= 0.8
        assert sp.snap(sp.snap([u])) == sp.snap([u])
    # A range too narrow for any k/size pins the dim to low.
    pinned = Space([{"name": "t", "low": 0.51, "high": 0.52, "size": 3}], compression=True)
    assert pinned.from_unit([0.7])["t"] == 0.51


def test_space_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="log-scaled"):
        Space([{"name": "x", "low": 0.0, "high": 1.0, "log": True}], compression=False)
    with pytest.raises(ValueError, match="unique"):
        Space([{"name": "x", "low": 0, "high": 1}, {"name": "x", "low": 0, "high": 1}], compression=False)
    sp = Space([{"name": "x", "low": 0, "high": 1}], compression=False)
    with pytest.raises(ValueError, match="lacks"):
        sp.to_unit({"y": 0.3})


def test_cost_model_matches_reference_ratio() -> None:
    ls = make_landscape(d=6, seed=3)
    # Add a layer whose cost couples two parameters (a channel group) and a constant term.
    prof = dict(ls.profile)
    a, b = ls.params[0], ls.params[1]
    prof["layers"] = list(prof["layers"]) + [
        {
            "name": "coupled", "type": "Conv2d", "method": "channel_l1", "shape": [8, 8, 3, 3], "params": [a["name"], b["name"]],
            "costs": {"params": {"terms": [
                {"coef": 9.0, "factors": [{"param": a["name"], "size": a["size"]}, {"param": b["name"], "size": b["size"]}]},
                {"coef": 11.0, "factors": []},
            ], "cap": 2000.0}},
            "dense": {"params": 2000.0},
        }
    ]
    prof["totals"] = {"params": prof["totals"]["params"] + 2000.0}
    sp = Space(ls.params, compression=True)
    cm = CostModel(prof, "params", sp.names)
    g = torch.Generator().manual_seed(0)
    U = torch.rand(200, sp.d, generator=g, dtype=torch.float64)
    theta_cont = sp.theta_from_unit(U)
    theta_snap = sp.snap_theta_tensor(U)
    exact = cm(theta_cont, exact=True)
    relaxed_at_grid = cm(theta_snap, exact=False)
    for i in range(U.shape[0]):
        ref = costs.ratio(prof, dict(zip(sp.names, theta_cont[i].tolist())), "params")
        assert exact[i].item() == pytest.approx(ref, rel=1e-12)
        ref_snap = costs.ratio(prof, dict(zip(sp.names, theta_snap[i].tolist())), "params")
        assert relaxed_at_grid[i].item() == pytest.approx(ref_snap, rel=1e-12)
    # The relaxation is differentiable.
    x = theta_cont[:3].clone().requires_grad_(True)
    cm(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad.abs().sum() > 0)


def test_cost_model_refuses_unknown_param() -> None:
    ls = make_landscape(d=2, seed=0)
    with pytest.raises(ValueError, match="not a search parameter"):
        CostModel(ls.profile, "params", ["layer0"])
    with pytest.raises(ValueError, match="cost kind"):
        CostModel(ls.profile, "flops", ["layer0", "layer1"])


def test_ratio_is_exact_and_for_compression_problems_only() -> None:
    ls = make_landscape(d=3, seed=1)
    theta = {p["name"]: p["high"] for p in ls.params}
    scal = Problem(ls.params, {"kind": "scalarized", "kappa": 2.0, "cost": "params"}, ls.profile, 4, 0)
    assert ratio(scal, theta) == pytest.approx(costs.ratio(ls.profile, theta, "params"))
    gen = Problem([{"name": "x", "type": "float", "low": 0, "high": 1}], {"metric": "y", "direction": "maximize"}, None, 4, 0)
    with pytest.raises(ValueError, match="compression"):
        ratio(gen, {"x": 0.2})


def test_nonfinite_observations_are_ignored() -> None:
    prob = Problem([{"name": "x", "type": "float", "low": 0, "high": 1}], {"metric": "y"}, None, 2, 0)
    obs = [Observation({"x": 0.1}, 1.0), Observation({"x": 0.5}, math.nan), Observation({"x": 0.9}, 0.3)]
    pts, _ = propose(prob, obs, [], 3, 1)
    assert len(pts) == 1 and 0.0 <= pts[0]["x"] <= 1.0

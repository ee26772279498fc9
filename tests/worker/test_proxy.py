"""The proxy of issue 13 on a real trained network with BatchNorm: leave-dense, exclusion, BN
re-estimation, least-squares correction, held-out accuracy, allocator signals and sensitivity."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import httpx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bocompress.costs import kept, ratio
from bocompress.schemas import CompressionSpec, ProfileReport, split_layer_patterns
from bocompress.worker.evaluate import fidelity, teacher_outputs
from bocompress.worker.proxy import (
    Holdout,
    ProxyOptions,
    batchnorms_after,
    job_profile,
    measure_trial,
    prepare,
    recalibrate_bn,
    split_holdout,
)
from bocompress.worker.methods import CompressorOptions, NoLayerMatched, build_compressor
from bocompress.worker.zoo.data import digits_split

THETA_MIN = 0.05


class BNNet(nn.Module):
    """A small conv net with BatchNorm for 8x8 digits (trained in the fixture)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Small tensors: one intra-op thread is as fast and does not fight the other processes for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> SimpleNamespace:
    """BNNet trained on scikit-learn's digits (train split, 200 Adam steps, seeded, ~1 s)."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        idx = torch.randint(0, len(x_tr), (64,), generator=gen)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    assert acc > 0.9, acc  # a real trained model, not a random one
    calib_x, calib_y, hold_x, hold_y = split_holdout(x_te, y_te, 0.3)
    return SimpleNamespace(model=model, x=calib_x, y=calib_y, hold_x=hold_x, hold_y=hold_y, acc=acc)


def _ctx(t: SimpleNamespace, method: object = "channel_l1", layers: object = ("*",), **proxy: object) -> SimpleNamespace:
    options = ProxyOptions(**proxy)  # type: ignore[arg-type]
    comp = build_compressor(t.model, method, list(layers) if not isinstance(layers, dict) else layers, THETA_MIN,
                            t.x[:8], CompressorOptions(calib_inputs=t.x, ls_correction=options.ls_correction))
    teacher = teacher_outputs(t.model, t.x)
    hold = Holdout(t.hold_x, t.hold_y, teacher_outputs(t.model, t.hold_x))
    return SimpleNamespace(compressor=comp, inputs=t.x, teacher=teacher, labels=t.y, holdout=hold,
                           device=torch.device("cpu"), cost_kind="params", proxy=options)


def _uniform(comp: object, value: float) -> dict[str, float]:
    return {p["name"]: value for p in comp.profile()["params"]}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- held-out split


def test_split_holdout_is_seeded_disjoint_and_ordered() -> None:
    x = torch.arange(100, dtype=torch.float32)[:, None]
    y = torch.arange(100) % 10
    cx, cy, hx, hy = split_holdout(x, y, 0.3)
    assert len(hx) == 30 and len(cx) == 70
    assert set(cx[:, 0].tolist()).isdisjoint(hx[:, 0].tolist())
    assert torch.equal(cx[:, 0].long() % 10, cy) and torch.equal(hx[:, 0].long() % 10, hy)
    assert bool((cx[1:, 0] > cx[:-1, 0]).all())  # the data's order is kept
    again = split_holdout(x, y, 0.3)
    assert torch.equal(again[2], hx)  # same seed, same split
    assert split_holdout(x, None, 0.3)[2] is None  # no labels: nothing held out
    assert split_holdout(x, y, 0.0)[2] is None


# --------------------------------------------------------------------------- BatchNorm re-estimation


def test_recalibrate_bn_gives_the_calibration_statistics(trained: SimpleNamespace) -> None:
    model = copy.deepcopy(trained.model)
    with torch.no_grad():
        model.bn1.running_mean.fill_(5.0)
        model.bn1.running_var.fill_(9.0)
    moms = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert recalibrate_bn(model, trained.x, ["bn1"]) == 1
    pre = model.conv1(trained.x)
    assert torch.allclose(model.bn1.running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model.bn1.running_var, pre.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3)
    assert torch.equal(model.bn2.running_mean, trained.model.bn2.running_mean)  # not asked: untouched
    assert not model.training and not any(m.training for m in model.modules())
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == moms


def test_only_batchnorms_after_the_first_change_are_reestimated(trained: SimpleNamespace) -> None:
    assert batchnorms_after(trained.model, ["conv2"], trained.x[:1]) == ["bn2", "bn3"]
    assert batchnorms_after(trained.model, [], trained.x[:1]) == []
    ctx = _ctx(trained, "tucker2", bn_recalibrate=True)
    # nothing changed (theta = 1): the model is the original, L is exactly 0
    model, _ = prepare(ctx.compressor, _uniform(ctx.compressor, 1.0), ctx.inputs, ctx.teacher, ctx.proxy)
    assert fidelity(model, ctx.inputs, ctx.teacher, None)[0] == 0.0


@pytest.mark.parametrize("method", ["channel_l1", "tucker2"])
def test_bn_reestimation_lowers_l_of_a_compressed_model(trained: SimpleNamespace, method: str) -> None:
    off = _ctx(trained, method, bn_recalibrate=False, ls_correction=False)
    on = _ctx(trained, method, bn_recalibrate=True, ls_correction=False)
    theta = _uniform(off.compressor, 0.4)
    v_off, v_on = measure_trial(off, theta)["values"], measure_trial(on, theta)["values"]
    assert v_on["ratio"] == v_off["ratio"] < 1.0
    assert v_on["distill_l2"] < v_off["distill_l2"], (v_on["distill_l2"], v_off["distill_l2"])
    assert v_on["bn_seconds"] > 0


# --------------------------------------------------------------------------- least squares


def test_ls_correction_lowers_l_for_channel_l1(trained: SimpleNamespace) -> None:
    plain = _ctx(trained, "channel_l1", bn_recalibrate=False, ls_correction=False)
    fitted = _ctx(trained, "channel_l1", bn_recalibrate=False, ls_correction=True)
    assert fitted.compressor.ls_correction and not plain.compressor.ls_correction
    theta = _uniform(plain.compressor, 0.4)
    a, b = measure_trial(plain, theta)["values"], measure_trial(fitted, theta)["values"]
    assert a["ratio"] == b["ratio"]  # the same shapes: the correction changes weights only
    assert b["distill_l2"] < 0.5 * a["distill_l2"], (a["distill_l2"], b["distill_l2"])
    assert b["accuracy"] >= a["accuracy"] - 0.02
    # every consumer of pruned channels was refitted: nothing left for BN re-estimation
    assert fitted.compressor.unrepaired_layers(theta) == []
    assert plain.compressor.unrepaired_layers(theta)


@pytest.mark.parametrize("method", ["tucker2", {"Conv2d": "tucker2", "Linear": "svd"}])
def test_ls_correction_of_the_last_factor(trained: SimpleNamespace, method: object) -> None:
    plain = _ctx(trained, method, bn_recalibrate=True, ls_correction=False)
    fitted = _ctx(trained, method, bn_recalibrate=True)  # on by default for svd / tucker2
    assert fitted.compressor.ls_correction and not plain.compressor.ls_correction
    theta = _uniform(plain.compressor, 0.3)
    a, b = measure_trial(plain, theta)["values"], measure_trial(fitted, theta)["values"]
    assert a["ratio"] == b["ratio"]
    assert b["distill_l2"] < a["distill_l2"] and b["distill_l2_holdout"] < a["distill_l2_holdout"]
    assert fitted.compressor.unrepaired_layers(theta) == []
    # theta = 1: nothing factorized, nothing refitted, the original exactly
    assert measure_trial(fitted, _uniform(fitted.compressor, 1.0))["values"]["distill_l2"] == 0.0


# --------------------------------------------------------------------------- trial values, fine-tune


def test_measure_trial_reports_held_out_accuracy_and_timings(trained: SimpleNamespace) -> None:
    ctx = _ctx(trained, "tucker2")
    v = measure_trial(ctx, _uniform(ctx.compressor, 1.0))["values"]
    assert v["distill_l2"] == 0.0 and v["distill_l2_holdout"] == 0.0
    hold_acc = float((ctx.holdout.teacher.argmax(1) == trained.hold_y).float().mean())
    calib_acc = float((ctx.teacher.argmax(1) == trained.y).float().mean())
    assert v["accuracy"] == pytest.approx(hold_acc) and v["accuracy_original"] == pytest.approx(hold_acc)
    assert v["accuracy_calib"] == pytest.approx(calib_acc)
    v = measure_trial(ctx, _uniform(ctx.compressor, 0.3))["values"]
    assert 0 < v["distill_l2"] and v["accuracy"] <= 1.0
    for key in ("apply_seconds", "bn_seconds", "measure_seconds", "eval_seconds"):
        assert v[key] >= 0, key
    assert v["eval_seconds"] >= v["measure_seconds"] + v["apply_seconds"] - 1e-9


def test_finetune_steps_lower_l(trained: SimpleNamespace) -> None:
    base = _ctx(trained, "channel_l1", ls_correction=False)
    tuned = _ctx(trained, "channel_l1", ls_correction=False, finetune_steps=30, finetune_lr=1e-3)
    theta = _uniform(base.compressor, 0.3)
    a, b = measure_trial(base, theta)["values"], measure_trial(tuned, theta)["values"]
    assert b["distill_l2"] < a["distill_l2"] and b["finetune_seconds"] > 0
    assert b["ratio"] == a["ratio"]


def test_finetune_keeps_magnitude_zeros(trained: SimpleNamespace) -> None:
    ctx = _ctx(trained, "magnitude", finetune_steps=10, finetune_lr=1e-2)
    theta = _uniform(ctx.compressor, 0.3)
    v = measure_trial(ctx, theta)["values"]
    assert v["ratio"] == pytest.approx(ratio(ctx.compressor.profile(), theta), rel=1e-12)


# --------------------------------------------------------------------------- profile: signals, sensitivity


@pytest.mark.parametrize("method", ["svd", "tucker2", "magnitude", "channel_l1", "channel_lasso"])
def test_signals_in_the_profile(trained: SimpleNamespace, method: str) -> None:
    comp = build_compressor(trained.model, method, ["*"], THETA_MIN, trained.x[:8], CompressorOptions(calib_inputs=trained.x))
    prof = comp.profile()
    ProfileReport.model_validate(prof)
    rows = {lay["name"]: lay for lay in prof["layers"]}
    for p in prof["params"]:
        assert p["high"] == 1.0 and p["low"] <= p["dense_from"] <= 1.0
        sig = rows[p["name"]]["signals"]
        g, e, s = sig["grid"], sig["energy"], sig["lamp"]
        assert len(g) == len(e) == len(s) <= 33 and g[0] == THETA_MIN and g[-1] == 1.0
        assert all(b > a for a, b in zip(g, g[1:]))
        assert all(b >= a for a, b in zip(e, e[1:])) and e[-1] == 1.0 and 0 <= e[0] < 1
        assert all(b <= a for a, b in zip(s, s[1:])) and s[-1] == 0.0 and s[0] > 0
        # from the break-even on, the layer is dense: everything kept
        assert all(ek == 1.0 and sk == 0.0 for t, ek, sk in zip(g, e, s) if t > p["dense_from"] + 1e-9)


def test_svd_energy_is_the_singular_value_energy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30, bias=False))
    comp = build_compressor(model, "svd", ["*"], THETA_MIN, torch.randn(4, 40))
    sig = comp.profile()["layers"][0]["signals"]
    s2 = torch.linalg.svdvals(model[0].weight.detach().double()) ** 2
    p = comp.profile()["params"][0]
    for t, e, lamp in zip(sig["grid"], sig["energy"], sig["lamp"]):
        r = kept(t, 30)
        if t < p["dense_from"]:
            assert e == pytest.approx(float(s2[:r].sum() / s2.sum()), rel=1e-6)
            assert lamp == pytest.approx(float(s2[r] / s2[: r + 1].sum()), rel=1e-6)


def test_job_profile_model_info_and_sensitivity(trained: SimpleNamespace) -> None:
    ctx = _ctx(trained, "channel_l1")
    prof = job_profile(ctx)
    ProfileReport.model_validate(prof)
    info = prof["model_info"]
    assert info["n_outputs"] == 10 and info["chance_accuracy"] == pytest.approx(0.1)
    assert info["accuracy_original"] == pytest.approx(float((ctx.holdout.teacher.argmax(1) == trained.hold_y).float().mean()))
    assert info["n_holdout"] == len(trained.hold_x) and info["n_calibration"] == len(trained.x)
    rows = {lay["name"]: lay for lay in prof["layers"]}
    for p in prof["params"]:
        sig = rows[p["name"]]["signals"]
        grid, curve = sig["sens_grid"], sig["sensitivity"]
        assert len(grid) == len(curve) <= 8 and grid[0] == THETA_MIN and grid[-1] == 1.0
        assert curve[-1] == 0.0 and curve[0] > 0
        assert all(b <= a for a, b in zip(curve, curve[1:]))
    off = job_profile(_ctx(trained, "channel_l1", sensitivity=False))
    assert all((lay.get("signals") or {}).get("sens_grid") is None for lay in off["layers"])


# --------------------------------------------------------------------------- leave dense, exclusion


@pytest.mark.parametrize("method", ["svd", "tucker2", "magnitude", "channel_l1"])
def test_exact_ratio_over_the_whole_box(trained: SimpleNamespace, method: str) -> None:
    comp = build_compressor(trained.model, method, ["*"], THETA_MIN, trained.x[:8])
    prof = comp.profile()
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        theta = {p["name"]: float(THETA_MIN + (1 - THETA_MIN) * torch.rand(1, generator=gen)) for p in prof["params"]}
        out = comp.apply(theta)
        assert comp.count_params(out) / prof["totals"]["params"] == pytest.approx(ratio(prof, theta), rel=1e-12)


@pytest.mark.parametrize("layers", [["!conv2"], ["*", "!conv2"], {"include": ["*"], "exclude": ["conv2"]}])
def test_excluded_layers_stay_dense(trained: SimpleNamespace, layers: object) -> None:
    for method in ("tucker2", "channel_l1"):
        comp = build_compressor(trained.model, method, layers, THETA_MIN, trained.x[:8])
        names = [p["name"] for p in comp.profile()["params"]]
        assert "conv2" not in names and names
        out = comp.apply({n: THETA_MIN for n in names})
        assert torch.equal(out.conv2.weight, trained.model.conv2.weight), method  # left as it is
        assert "excluded" in comp.profile()["model_info"]["skipped"]["conv2"]


def test_bad_exclusions_are_loud(trained: SimpleNamespace) -> None:
    with pytest.raises(NoLayerMatched, match="conv9"):
        build_compressor(trained.model, "tucker2", ["!conv9"], THETA_MIN, trained.x[:8])
    with pytest.raises(NoLayerMatched, match="conv2"):
        build_compressor(trained.model, "tucker2", {"include": ["conv2"], "exclude": ["conv2"]}, THETA_MIN, trained.x[:8])
    assert split_layer_patterns(["conv*", "!conv1"]) == (["conv*"], ["conv1"])
    assert split_layer_patterns({"exclude": ["fc"]}) == (["*"], ["fc"])
    spec = CompressionSpec(model="m", data="d", method="svd", layers={"exclude": ["fc*"]})
    assert spec.bn_recalibrate and spec.holdout_fraction == 0.3 and spec.finetune_steps == 0 and spec.sensitivity


BAD_LAYERS = [["!"], [], {"include": []}, {"exclude": ["x"], "other": 1}, ["ok", ""], {"include": ["!a"]}]


def test_layer_specs_over_http(admin: httpx.Client) -> None:
    base = {"name": "c", "objective": {"kind": "scalarized"}}
    for bad in BAD_LAYERS:
        r = admin.post("/api/v1/jobs", json={**base, "compression": {"model": "digits-cnn", "data": "digits",
                                                                      "method": "svd", "layers": bad}})
        assert r.status_code == 422 and "compression.layers" in r.json()["detail"], (bad, r.text)
    for fields in ({"holdout_fraction": 1.0}, {"finetune_steps": -1}, {"bn_recalibrate": "maybe"}):
        r = admin.post("/api/v1/jobs", json={**base, "compression": {"model": "digits-cnn", "data": "digits",
                                                                      "method": "svd", **fields}})
        assert r.status_code == 422 and next(iter(fields)) in r.json()["detail"], (fields, r.text)
    good = {"model": "digits-cnn", "data": "digits", "method": "svd", "layers": {"include": ["fc*"], "exclude": ["fc2"]},
            "bn_recalibrate": False, "finetune_steps": 5}
    r = admin.post("/api/v1/jobs", json={**base, "compression": good})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["compression"]["layers"] == {"include": ["fc*"], "exclude": ["fc2"]}
    assert not math.isnan(r.json()["id"])

"""Compression methods: exact reconstruction at full rank, exact densities, exact cost forms."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from bocompress.costs import kept, ratio
from bocompress.schemas import ProfileReport
from bocompress.worker.methods import (
    METHOD_MODULES,
    CompositeCompressor,
    CompressionError,
    CompressorOptions,
    NoLayerMatched,
    build_compressor,
    get_compressor_class,
)
from bocompress.worker.methods.magnitude import MagnitudeCompressor
from bocompress.worker.methods.svd import SVDCompressor
from bocompress.worker.methods.tucker2 import Tucker2Compressor
from bocompress.worker.zoo import load_data, load_model

THETA_MIN = 0.05
MAPPING = {"Conv2d": "tucker2", "Linear": "svd"}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_data("digits", 64)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return load_model("digits-cnn")


@pytest.fixture(scope="module")
def compressors(cnn: nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> dict[str, object]:
    x = digits[0][:8]
    return {str(m): build_compressor(cnn, m, ["*"], THETA_MIN, x) for m in ("svd", "tucker2", "magnitude")} | {
        "mapping": build_compressor(cnn, MAPPING, ["*"], THETA_MIN, x)
    }


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


# --------------------------------------------------------------------------- full rank


def test_svd_full_rank_reproduces_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 12))
    x = torch.randn(16, 20)
    comp = build_compressor(model, "svd", ["*"], THETA_MIN, x)
    assert isinstance(comp, SVDCompressor)
    for name, size in (("0", 20), ("2", 12)):
        layer = model.get_submodule(name)
        fact = comp.factorize(name, size)
        inp = torch.randn(16, layer.in_features)
        assert _max_diff(layer, fact, inp) < 1e-4
    # theta = 1 keeps dense layers: the model is reproduced exactly.
    assert _max_diff(model, comp.apply({"0": 1.0, "2": 1.0}), x) == 0.0


def test_svd_full_rank_reproduces_1x1_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 6, 1, bias=False))
    x = torch.randn(4, 8, 9, 9)
    comp = build_compressor(model, "svd", ["*"], THETA_MIN, x)
    assert _max_diff(model[0], comp.factorize("0", 8), x) < 1e-4
    assert _max_diff(model[2], comp.factorize("2", 6), torch.randn(4, 16, 5, 5)) < 1e-4


def test_svd_truncation_is_eckart_young() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 40, bias=False))
    comp = build_compressor(model, "svd", ["*"], THETA_MIN, torch.randn(2, 24))
    w = model[0].weight.detach().double()
    sv = torch.linalg.svdvals(w)
    for r in (1, 3, 7):
        f = comp.factorize("0", r)
        approx = (f[1].weight @ f[0].weight).detach().double()
        assert abs(float(torch.linalg.matrix_norm(w - approx, 2)) - float(sv[r])) < 1e-4


def test_tucker2_full_rank_reproduces_digits_cnn(cnn: nn.Module, digits: tuple[torch.Tensor, torch.Tensor], compressors: dict) -> None:
    comp: Tucker2Compressor = compressors["tucker2"]
    x = digits[0][:16]
    feats = torch.relu(cnn.conv1(x))
    for name, inp in (("conv1", x), ("conv2", feats)):
        layer = cnn.get_submodule(name)
        fact = comp.factorize(name, layer.in_channels, layer.out_channels)
        assert _max_diff(layer, fact, inp) < 1e-4


def test_tucker2_full_rank_reproduces_vgg16_layer() -> None:
    model = load_model("vgg16")
    x, _ = load_data("synthetic", 2, arch="vgg16")
    comp = build_compressor(model, "tucker2", ["features.7"], THETA_MIN, x)
    assert [p["name"] for p in comp.profile()["params"]] == ["features.7"]
    layer = model.features[7]  # 64 -> 128, 3x3, at 16x16
    inp = torch.randn(2, 64, 16, 16)
    assert _max_diff(layer, comp.factorize("features.7", 64, 128), inp) < 1e-4


def test_tucker2_strided_and_shortcut_convs() -> None:
    model = load_model("resnet20")
    x, _ = load_data("synthetic", 1, arch="resnet20")
    comp = build_compressor(model, "tucker2", ["layer2.0.*"], THETA_MIN, x)
    names = [p["name"] for p in comp.profile()["params"]]
    assert names == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"]
    inp = torch.randn(1, 16, 32, 32)
    for name in ("layer2.0.conv1", "layer2.0.shortcut.0"):
        layer = model.get_submodule(name)
        assert _max_diff(layer, comp.factorize(name, 16, 32), inp) < 1e-4
    # theta in [theta_min, 1]; the job's cost decides where a conv is left dense, so ITS form is
    # exact everywhere (the strided conv1 is cheaper in params than in flops: they differ there)
    flops_comp = build_compressor(model, "tucker2", ["layer2.0.*"], THETA_MIN, x, CompressorOptions(cost_kind="flops"))
    prof, fprof = comp.profile(), flops_comp.profile()
    rng = random.Random(0)
    for _ in range(6):
        theta = {p["name"]: rng.uniform(p["low"], p["high"]) for p in prof["params"]}
        out = comp.apply(theta)
        assert comp.count_params(out) / prof["totals"]["params"] == ratio(prof, theta, "params")
        fout = flops_comp.apply(theta)
        measured = flops_comp.count_flops(fout, x) / fprof["totals"]["flops"]
        assert measured == pytest.approx(ratio(fprof, theta, "flops"), rel=1e-9)


# --------------------------------------------------------------------------- magnitude


def test_magnitude_keeps_exact_density(compressors: dict, cnn: nn.Module) -> None:
    comp: MagnitudeCompressor = compressors["magnitude"]
    for t in (0.05, 0.1234, 0.5, 0.77, 0.999):
        out = comp.apply({name: t for name in comp.param_names})
        for name in comp.param_names:
            w = out.get_submodule(name).weight
            assert int(torch.count_nonzero(w)) == kept(t, w.numel()), (name, t)
            # the kept weights are the largest by magnitude and unchanged
            orig = cnn.get_submodule(name).weight
            mask = w != 0
            assert torch.equal(w[mask], orig[mask])
            if (~mask).any():
                assert orig[mask].abs().min() >= orig[~mask].abs().max()


def test_magnitude_breaks_ties_deterministically() -> None:
    model = nn.Sequential(nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    comp = build_compressor(model, "magnitude", ["*"], THETA_MIN, torch.randn(2, 10))
    for t in (0.05, 0.33, 0.9):
        w = comp.apply({"0": t})[0].weight.flatten()
        k = kept(t, 100)
        assert int(torch.count_nonzero(w)) == k
        assert bool((w[:k] != 0).all()) and bool((w[k:] == 0).all())  # lowest flat indices win ties


def test_magnitude_counts_preexisting_zeros() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight[:, :4] = 0.0  # half the weights already zero
    x = torch.randn(2, 8)
    comp = build_compressor(model, "magnitude", ["*"], THETA_MIN, x)
    prof = comp.profile()
    for t in (0.25, 0.5, 0.75, 1.0):
        out = comp.apply({"0": t})
        assert comp.count_params(out) / prof["totals"]["params"] == ratio(prof, {"0": t}, "params")


# --------------------------------------------------------------------------- exact cost forms


@pytest.mark.parametrize("which", ["svd", "tucker2", "magnitude", "mapping"])
def test_exact_ratio_matches_measured(which: str, compressors: dict, digits: tuple[torch.Tensor, torch.Tensor], cnn: nn.Module) -> None:
    comp = compressors[which]
    prof = comp.profile()
    ProfileReport.model_validate(prof)
    x = digits[0][:4]
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    rng = random.Random(42)
    for i in range(6):
        # inside the search box, and (every other trial) anywhere in [theta_min, 1]
        theta = {p["name"]: rng.uniform(p["low"], p["high"] if i % 2 == 0 else 1.0) for p in prof["params"]}
        out = comp.apply(theta)
        exact_p = ratio(prof, theta, "params")
        assert comp.count_params(out) / prof["totals"]["params"] == exact_p
        if which != "magnitude":
            assert sum(p.numel() for p in out.parameters()) / prof["totals"]["params"] == exact_p
        measured_f = comp.count_flops(out, x) / prof["totals"]["flops"]
        assert measured_f == pytest.approx(ratio(prof, theta, "flops"), rel=0.01)
    after = cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "apply modified the original model"


def test_profile_totals_match_the_model(compressors: dict, cnn: nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    x = digits[0][:8]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        cnn(x)
    for comp in compressors.values():
        totals = comp.profile()["totals"]
        assert totals["params"] == sum(p.numel() for p in cnn.parameters())
        assert totals["flops"] == counter.get_total_flops() / len(x)


def test_search_reaches_dense_and_dense_from_is_break_even(compressors: dict) -> None:
    """Contract of issue 13: high = 1 for every layer; from ``dense_from`` on the layer stays dense."""
    comp: SVDCompressor = compressors["svd"]
    prof = comp.profile()
    for p in prof["params"]:
        assert p["high"] == 1.0
        layer = next(lay for lay in prof["layers"] if lay["name"] == p["name"])
        n, m = layer["shape"]
        r_dense = kept(p["dense_from"] + 1e-9, p["size"])
        assert r_dense * (m + n) >= n * m  # at dense_from: the dense layer
        assert (r_dense - 1) * (m + n) < n * m  # one rank below: a cheaper factorization
        for t in (p["dense_from"] + 1e-9, 0.5 * (1 + p["dense_from"]), 1.0):
            theta = {q["name"]: (t if q is p else THETA_MIN) for q in prof["params"]}
            out = comp.apply(theta)
            assert isinstance(out.get_submodule(p["name"]), nn.Linear)
            assert ratio(prof, theta) == comp.count_params(out) / prof["totals"]["params"]
    for which in ("tucker2", "magnitude", "mapping"):
        assert all(p["high"] == 1.0 and 0 < p["dense_from"] <= 1.0 for p in compressors[which].profile()["params"])


def test_mapping_builds_a_composite(compressors: dict) -> None:
    comp = compressors["mapping"]
    assert isinstance(comp, CompositeCompressor)
    layers = {lay["name"]: lay["method"] for lay in comp.profile()["layers"]}
    assert layers == {"conv1": "tucker2", "conv2": "tucker2", "conv3": "tucker2", "fc1": "svd", "fc2": "svd"}


def test_mapping_with_one_type_matched_returns_that_method(cnn: nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    comp = build_compressor(cnn, MAPPING, ["fc*"], THETA_MIN, digits[0][:4])
    assert isinstance(comp, SVDCompressor)
    with pytest.raises(CompressionError, match="cannot be mixed"):
        build_compressor(cnn, {"Conv2d": "channel_l1", "Linear": "svd"}, ["*"], THETA_MIN, digits[0][:4])


# --------------------------------------------------------------------------- errors and registry


def test_no_layer_matched_names_the_patterns(cnn: nn.Module, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = digits[0][:4]
    with pytest.raises(NoLayerMatched, match="nothing_here"):
        build_compressor(cnn, "svd", ["fc*", "nothing_here*"], THETA_MIN, x)
    with pytest.raises(NoLayerMatched, match=r"conv1.*1x1"):
        build_compressor(cnn, "svd", ["conv1"], THETA_MIN, x)
    with pytest.raises(ValueError, match="fc9"):
        build_compressor(cnn, MAPPING, ["conv*", "fc9"], THETA_MIN, x)


def test_theta_errors(compressors: dict) -> None:
    with pytest.raises(CompressionError, match="fc1"):
        compressors["svd"].apply({"fc2": 0.5})


def test_registry_is_lazy_and_isolates_broken_methods(monkeypatch: pytest.MonkeyPatch, cnn: nn.Module) -> None:
    assert get_compressor_class("tucker2") is Tucker2Compressor
    with pytest.raises(CompressionError, match="unknown compression method"):
        get_compressor_class("zip")
    monkeypatch.setitem(METHOD_MODULES, "channel_lasso", "bocompress.worker.methods._no_such_module")
    import bocompress.worker.methods as wm

    monkeypatch.delitem(wm._CLASSES, "channel_lasso", raising=False)
    with pytest.raises(CompressionError, match="channel_lasso.*unavailable"):
        get_compressor_class("channel_lasso")
    assert get_compressor_class("svd") is SVDCompressor


def test_caches_follow_a_moved_model(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A model moved (to another device or dtype holder) after building still compresses."""
    import copy

    model = copy.deepcopy(load_model("digits-cnn"))
    x = digits[0][:4]
    comps = [build_compressor(model, m, ["*"], THETA_MIN, x) for m in ("svd", "tucker2", "magnitude")]
    target = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(target)
    for comp in comps:
        out = comp.apply({p["name"]: 0.3 for p in comp.profile()["params"]})
        assert all(p.device.type == target for p in out.parameters())
        with torch.no_grad():
            out(x.to(target))

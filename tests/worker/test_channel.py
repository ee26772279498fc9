"""Channel pruning (channel_l1, channel_lasso): dependency groups, exact cost forms, He et al.'s quality."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bocompress.costs import kept, ratio
from bocompress.schemas import ProfileReport
from bocompress.worker.evaluate import evaluate, teacher_outputs
from bocompress.worker.methods import NoLayerMatched, build_compressor, get_compressor_class
from bocompress.worker.methods.base import CompressionError, CompressorOptions, measure_flops
from bocompress.worker.methods.channel_l1 import ChannelL1Compressor
from bocompress.worker.methods.channel_lasso import ChannelLassoCompressor
from bocompress.worker.methods.channel_select import (
    lasso_select,
    least_squares_weight,
    relative_error,
    select_first_k,
    select_max_response,
)
from bocompress.worker.methods.lsq import conv_patches
from bocompress.worker.zoo import load_data, load_model

THETA_MIN = 0.05
KINDS = ("params", "flops", "channels", "activation")


# --------------------------------------------------------------------------- small models


class PlainCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv, flatten into two Linear layers (the last is the classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class TinyResNet(nn.Module):
    """A stem and two basic blocks (identity, then 1x1-projection shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.l1 = Block(8, 8, 1)
        self.l2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.l2(self.l1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatNet(nn.Module):
    """Two convs concatenated, a conv and a depthwise conv: several groups prune one layer's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(11)
        self.c = nn.Conv2d(11, 7, 3, padding=1)
        self.dw = nn.Conv2d(7, 7, 3, padding=1, groups=7)
        self.fc = nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.dw(F.relu(self.c(y))).mean((2, 3)))


def _make(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so pruning them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _thetas(names: list[str], n: int, seed: int) -> list[dict[str, float]]:
    rng = random.Random(seed)
    return [{name: rng.uniform(THETA_MIN, 1.0) for name in names} for _ in range(n)]


def _check_exact_costs(comp, model: nn.Module, x: Tensor, thetas: list[dict[str, float]]) -> None:
    """ratio(profile) == measured: params exactly; flops, channels, activation within 1% (exact here)."""
    profile = comp.profile()
    ProfileReport.model_validate(profile)
    totals = profile["totals"]
    assert totals["params"] == sum(p.numel() for p in model.parameters())
    assert totals["flops"] == measure_flops(model, x[:2])
    for kind in ("channels", "activation"):
        assert totals[kind] == comp.count_cost(model, kind, x[:2])
    n0 = sum(p.numel() for p in model.parameters())
    for theta in thetas:
        pruned = comp.apply(theta)
        n1 = sum(p.numel() for p in pruned.parameters())
        assert ratio(profile, theta, "params") == n1 / n0, theta
        for kind in ("flops", "channels", "activation"):
            measured = comp.count_cost(pruned, kind, x[:2]) / totals[kind]
            assert measured == pytest.approx(ratio(profile, theta, kind), rel=1e-2, abs=0), (kind, theta)
            assert measured == pytest.approx(ratio(profile, theta, kind), rel=1e-9), (kind, theta)
        with torch.no_grad():
            assert pruned(x).shape == model(x).shape


# --------------------------------------------------------------------------- channel_l1


def test_l1_plain_cnn_exact_costs_and_classifier_kept() -> None:
    model, x = _make(PlainCNN), torch.randn(4, 1, 8, 8)
    comp = ChannelL1Compressor(model, ["*"], THETA_MIN, x, "channel_l1")
    profile = comp.profile()
    names = [p["name"] for p in profile["params"]]
    assert names == ["features.0", "features.3", "features.7", "fc1"]
    assert {p["name"]: p["size"] for p in profile["params"]} == {"features.0": 8, "features.3": 16, "features.7": 12, "fc1": 24}
    layers = {row["name"]: row for row in profile["layers"]}
    # the classifier's out-features are never searched, but its in-features shrink with fc1
    assert "fc2" in layers and layers["fc2"]["params"] == ["fc1"]
    # the Linear after the flatten: 16 features per channel of features.7
    fc1_terms = layers["fc1"]["costs"]["params"]["terms"]
    assert {"coef": 16.0, "factors": [{"param": "fc1", "size": 24}, {"param": "features.7", "size": 12}]} in fc1_terms
    assert layers["features.1"]["costs"]["params"]["terms"] == [
        {"coef": 2.0, "factors": [{"param": "features.0", "size": 8}]}
    ]
    assert profile["model_info"]["skipped"] == {"fc2": "its output channels are the model's outputs"}
    _check_exact_costs(comp, model, x, _thetas(names, 6, seed=1))


def test_l1_residual_groups_share_one_theta() -> None:
    model, x = _make(TinyResNet), torch.randn(3, 3, 16, 16)
    comp = ChannelL1Compressor(model, ["*"], THETA_MIN, x, "channel_l1")
    groups = comp.profile()["model_info"]["groups"]
    assert list(groups) == ["conv", "l1.conv1", "l2.conv1", "l2.conv2"]
    # the stem, the identity block's conv2 and the next block's inputs: one residual group
    assert {"conv", "bn", "l1.conv2", "l1.bn2", "l1.conv1", "l2.conv1", "l2.short.0"} <= set(groups["conv"])
    assert {"l2.conv2", "l2.bn2", "l2.short.0", "l2.short.1", "fc"} <= set(groups["l2.conv2"])
    _check_exact_costs(comp, model, x, _thetas(list(groups), 6, seed=2))
    # a pruned residual sum still adds matching shapes and keeps the same channels on both sides
    pruned = comp.apply({"conv": 0.5, "l1.conv1": 1.0, "l2.conv1": 1.0, "l2.conv2": 0.5})
    assert pruned.conv.out_channels == pruned.l1.conv2.out_channels == pruned.l2.short[0].in_channels == 4
    assert pruned.l2.conv2.out_channels == pruned.l2.short[0].out_channels == pruned.fc.in_features == 8


def test_l1_keeps_the_largest_l1_filters_and_leaves_the_original() -> None:
    model, x = _make(PlainCNN), torch.randn(4, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Li et al.'s pruning as such: the least-squares correction (on by default) off
    comp = ChannelL1Compressor(model, ["features.*"], THETA_MIN, x, "channel_l1", CompressorOptions(ls_correction=False))
    assert [g.name for g in comp.groups] == ["features.0", "features.3", "features.7"]
    theta = {"features.0": 1.0, "features.3": 0.5, "features.7": 1.0}
    pruned = comp.apply(theta)
    w = model.features[3].weight.detach()
    top = torch.argsort(w.abs().sum(dim=(1, 2, 3)), descending=True)[: kept(0.5, 16)].sort().values
    assert torch.equal(pruned.features[3].weight, w[top])
    assert torch.equal(pruned.features[4].running_mean, model.features[4].running_mean[top])
    assert torch.equal(pruned.features[7].weight, model.features[7].weight[:, top])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    full = comp.apply({n: 1.0 for n in theta})
    with torch.no_grad():
        assert torch.equal(full(x), model(x))


def test_l1_patterns_method_mapping_and_errors() -> None:
    model, x = _make(PlainCNN), torch.randn(2, 1, 8, 8)
    only = ChannelL1Compressor(model, ["features.3"], THETA_MIN, x, "channel_l1")
    assert [g.name for g in only.groups] == ["features.3"]
    assert {row["name"] for row in only.profile()["layers"]} == {"features.3", "features.4", "features.7"}
    linear = ChannelL1Compressor(model, ["*"], THETA_MIN, x, {"Linear": "channel_l1"})
    assert [g.name for g in linear.groups] == ["fc1"]
    with pytest.raises(NoLayerMatched, match="model's outputs"):
        ChannelL1Compressor(model, ["fc2"], THETA_MIN, x, "channel_l1")
    with pytest.raises(NoLayerMatched, match="nothing"):
        ChannelL1Compressor(model, ["features.3", "nothing*"], THETA_MIN, x, "channel_l1")
    with pytest.raises(CompressionError, match="theta has no value"):
        only.apply({"features.0": 0.5})


def test_l1_concatenation_and_depthwise_exact() -> None:
    model, x = _make(ConcatNet), torch.randn(3, 3, 8, 8)
    comp = ChannelL1Compressor(model, ["*"], THETA_MIN, x, "channel_l1")
    assert [g.name for g in comp.groups] == ["a", "b", "c"]
    assert "dw" in comp.profile()["model_info"]["groups"]["c"]
    _check_exact_costs(comp, model, x, _thetas(["a", "b", "c"], 6, seed=3))
    pruned = comp.apply({"a": 0.5, "b": 0.2, "c": 0.43})
    assert pruned.c.in_channels == pruned.bn.num_features == kept(0.5, 6) + kept(0.2, 5)
    assert pruned.dw.groups == pruned.dw.out_channels == pruned.fc.in_features == kept(0.43, 7)


def test_l1_resnet20_exact() -> None:
    model = load_model("resnet20")
    x, _ = load_data("synthetic", 4, seed=0, arch="resnet20")
    comp = ChannelL1Compressor(model, ["*"], THETA_MIN, x, "channel_l1")
    names = [g.name for g in comp.groups]
    assert len(names) == 12  # 3 stage-wide residual groups + one inner group per block
    assert all(g.size in (16, 32, 64) for g in comp.groups)
    _check_exact_costs(comp, model, x, _thetas(names, 3, seed=4))


# --------------------------------------------------------------------------- channel_lasso helpers


def test_conv_patches_reproduce_the_convolution() -> None:
    torch.manual_seed(0)
    for conv in (nn.Conv2d(5, 7, 3, padding=1), nn.Conv2d(5, 7, (3, 5), stride=2, padding=(2, 1), dilation=(2, 1))):
        x = torch.randn(4, 5, 11, 9)
        with torch.no_grad():
            y = conv(x)
            b = torch.randint(0, 4, (60,))
            oh, ow = torch.randint(0, y.shape[2], (60,)), torch.randint(0, y.shape[3], (60,))
            patches = conv_patches(conv, x, b, oh, ow)
            pred = torch.einsum("siq,oiq->so", patches, conv.weight.reshape(7, 5, -1)) + conv.bias
        assert torch.allclose(pred, y[b, :, oh, ow], atol=1e-5)


def test_lasso_select_exact_count_and_least_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(400, 12, 9, generator=gen)
    weight = torch.randn(6, 12, 3, 3, generator=gen)
    weight[:, [2, 7]] *= 0.01  # two nearly useless channels
    target = torch.einsum("siq,oiq->so", patches, weight.reshape(6, 12, 9))
    for k in (1, 3, 6, 10, 12):
        keep = lasso_select(patches, weight, target, k)
        assert keep.numel() == k and torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == k
    assert not {2, 7} & set(lasso_select(patches, weight, target, 10).tolist())
    # all channels kept: least squares recovers the weight (and a bias)
    w, b = least_squares_weight(patches, target + 0.3, with_bias=True)
    assert torch.allclose(w, weight.reshape(6, 12, 9), atol=1e-3) and torch.allclose(b, torch.full((6,), 0.3), atol=1e-3)
    assert torch.equal(select_first_k(weight, 4), torch.arange(4))
    l1 = weight.abs().sum(dim=(0, 2, 3))
    assert set(select_max_response(weight, 4).tolist()) == set(torch.topk(l1, 4).indices.tolist())
    with pytest.raises(CompressionError):
        select_first_k(weight, 13)


# --------------------------------------------------------------------------- channel_lasso


def test_lasso_free_input_channels_only_and_exact_costs() -> None:
    model, x = _make(TinyResNet), torch.randn(16, 3, 16, 16)
    comp = ChannelLassoCompressor(model, ["*"], THETA_MIN, x, "channel_lasso", n_points=300)
    assert comp.param_names == ["l1.conv2", "l2.conv2"]  # the convs after a block's first conv
    layers = {row["name"]: row for row in comp.profile()["layers"]}
    assert set(layers) == {"l1.conv1", "l1.bn1", "l1.conv2", "l2.conv1", "l2.bn1", "l2.conv2"}
    _check_exact_costs(comp, model, x, _thetas(comp.param_names, 3, seed=5))

    cnn, xc = _make(PlainCNN), torch.randn(32, 1, 8, 8)
    comp = ChannelLassoCompressor(cnn, ["*"], THETA_MIN, xc, "channel_lasso", n_points=300)
    assert comp.param_names == ["features.3", "features.7"]  # fc1 reads a flatten: not a Conv2d
    _check_exact_costs(comp, cnn, xc, _thetas(comp.param_names, 3, seed=6))
    with pytest.raises(NoLayerMatched):
        ChannelLassoCompressor(cnn, ["features.0"], THETA_MIN, xc, "channel_lasso")


def test_lasso_resnet20_exact() -> None:
    model = load_model("resnet20")
    x, _ = load_data("synthetic", 8, seed=0, arch="resnet20")
    comp = ChannelLassoCompressor(model, ["layer1.*", "layer3.*"], THETA_MIN, x, "channel_lasso", n_points=200)
    assert comp.param_names == [f"layer{s}.{b}.conv2" for s in (1, 3) for b in range(3)]
    _check_exact_costs(comp, model, x, _thetas(comp.param_names, 1, seed=7))


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, Tensor, Tensor]:
    """The zoo's trained digits CNN, 384 training images (calibration) and the 450 held-out ones."""
    calib, _ = load_data("digits-train", 384, seed=0)
    held_out, _ = load_data("digits", 450, seed=0)
    return load_model("digits-cnn"), calib, held_out


def _layer_io(model: nn.Module, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    got: dict[str, Tensor] = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: got.update(x=a[0], y=o))
    with torch.no_grad():
        model(x)
    h.remove()
    return got["x"], got["y"]


@pytest.mark.parametrize("name", ["conv2", "conv3"])
def test_lasso_beats_first_k_and_max_response_on_trained_digits_cnn(digits, name: str) -> None:
    """He et al.'s claim, on held-out digits: LASSO + least squares reconstructs the layer best."""
    model, calib, held_out = digits
    comp = ChannelLassoCompressor(model, [name], THETA_MIN, calib[:8], "channel_lasso", calib_inputs=calib, n_points=1000)
    assert comp.param_names == [name]
    conv = model.get_submodule(name)
    x, y = _layer_io(model, name, held_out)
    for theta in (0.5, 0.25):
        pruned, keep = comp.apply_with_selection({name: theta})
        k = kept(theta, conv.in_channels)
        assert keep[name].numel() == k == pruned.get_submodule(name).in_channels
        err_lasso = relative_error(_layer_io(pruned, name, held_out)[1], y)
        with torch.no_grad():
            baseline = {
                fn.__name__: relative_error(F.conv2d(x[:, s], conv.weight[:, s], conv.bias, padding=1), y)
                for fn in (select_first_k, select_max_response)
                for s in [fn(conv.weight, k)]
            }
        assert err_lasso < baseline["select_first_k"], (theta, err_lasso, baseline)
        assert err_lasso < baseline["select_max_response"], (theta, err_lasso, baseline)
        assert err_lasso < 0.5 * min(baseline.values()), (theta, err_lasso, baseline)


def test_lasso_identity_at_full_keep_and_original_untouched(digits) -> None:
    model, calib, held_out = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comp = ChannelLassoCompressor(model, ["*"], THETA_MIN, calib[:8], "channel_lasso", calib_inputs=calib[:64], n_points=400)
    full = comp.apply({n: 1.0 for n in comp.param_names})
    with torch.no_grad():
        assert torch.equal(full(held_out), model(held_out))
    comp.apply({n: 0.3 for n in comp.param_names})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- integration


def test_registry_and_evaluate_measure_every_cost_kind(digits) -> None:
    model, calib, held_out = digits
    assert get_compressor_class("channel_l1") is ChannelL1Compressor
    assert get_compressor_class("channel_lasso") is ChannelLassoCompressor
    teacher = teacher_outputs(model, held_out[:128])
    for method in ("channel_l1", "channel_lasso"):
        comp = build_compressor(model, method, ["*"], THETA_MIN, calib[:64])
        theta = {p["name"]: 0.6 for p in comp.profile()["params"]}
        pruned = comp.apply(theta)
        for kind in KINDS:
            out = evaluate(comp, pruned, held_out[:128], teacher, None, theta, cost_kind=kind)
            assert out["values"]["ratio"] == pytest.approx(out["values"]["ratio_exact"], rel=1e-9)
            assert 0.0 < out["values"]["ratio"] < 1.0
        assert out["values"]["distill_l2"] < 1.0

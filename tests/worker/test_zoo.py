"""The model zoo: architectures, shipped digits weights, weight checks, calibration data."""

from __future__ import annotations

import pytest
import torch

from worker.zoo import ARCHS, WEIGHTS_DIR, WeightsMismatch, ZooError, input_shape, load_data, load_model


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_architectures_run_on_their_input_shape(name: str) -> None:
    model = load_model(name)
    assert not model.training
    x, labels = load_data("synthetic", 2, arch=name)
    assert labels is None and tuple(x.shape) == (2, *input_shape(name))
    with torch.no_grad():
        assert tuple(model(x).shape) == (2, 10)


def test_cifar_models_have_the_expected_structure() -> None:
    vgg = load_model("vgg16")
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in vgg.modules() if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(fcs)) == (13, 3)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules())
    r20, r56 = load_model("resnet20"), load_model("resnet56")
    n_conv = lambda m: sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())  # noqa: E731
    assert n_conv(r20) == 19 + 2 and n_conv(r56) == 55 + 2  # 6n+1 convs + 2 option-B shortcut convs
    assert sum(p.numel() for p in r20.parameters()) < sum(p.numel() for p in r56.parameters())


def test_random_init_is_deterministic() -> None:
    a, b = load_model("resnet20"), load_model("resnet20")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_digits_models_ship_trained_weights(name: str) -> None:
    path = WEIGHTS_DIR / f"{name}.safetensors"
    assert path.is_file() and path.stat().st_size < 1_000_000
    model = load_model(name)
    x, y = load_data("digits", 10_000)
    assert tuple(x.shape) == (450, 1, 8, 8) and tuple(y.shape) == (450,)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.97, acc


def test_wrong_state_dict_names_the_tensor() -> None:
    good = load_model("digits-cnn").state_dict()
    bad = dict(good)
    bad["conv2.weight"] = torch.zeros(64, 32, 5, 5)
    with pytest.raises(WeightsMismatch, match=r"conv2\.weight.*\[64, 32, 5, 5\].*\[64, 32, 3, 3\]"):
        load_model("digits-cnn", bad)
    missing = {k: v for k, v in good.items() if k != "fc1.bias"}
    with pytest.raises(WeightsMismatch, match=r"missing.*fc1\.bias"):
        load_model("digits-cnn", missing)
    extra = dict(good, **{"head.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatch, match=r"unexpected.*head\.weight"):
        load_model("digits-cnn", extra)
    assert issubclass(WeightsMismatch, ValueError)
    # a correct state dict loads and is used
    sd = {k: v.clone() for k, v in good.items()}
    sd["fc2.bias"] += 1.0
    assert torch.equal(load_model("digits-cnn", sd).fc2.bias, sd["fc2.bias"])


def test_load_data() -> None:
    x, y = load_data("digits", 64, seed=3)
    assert tuple(x.shape) == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x2, y2 = load_data("digits", 64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, load_data("digits", 64, seed=4)[0])
    s1, _ = load_data("synthetic", 5, seed=1, arch="vgg16")
    assert tuple(s1.shape) == (5, 3, 32, 32) and torch.equal(s1, load_data("synthetic", 5, seed=1, arch="vgg16")[0])
    xt, yt = load_data("digits-train", 10_000)
    assert len(xt) == 1347
    with pytest.raises(ZooError, match="arch"):
        load_data("synthetic", 4)
    with pytest.raises(ZooError, match="unknown dataset"):
        load_data("imagenet", 4)
    with pytest.raises(ZooError, match="unknown zoo model"):
        load_model("resnet18")


def test_training_is_deterministic() -> None:
    from worker.zoo.train import train

    a, _ = train("digits-mlp", epochs=1)
    b, _ = train("digits-mlp", epochs=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

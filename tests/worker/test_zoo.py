"""The model zoo: architectures, shipped trained weights, weight checks, calibration data."""

from __future__ import annotations

import re

import pytest
import torch

from bocompress.worker.zoo import (
    ARCHS,
    DATASETS,
    WEIGHTS_DIR,
    WeightsMismatch,
    ZooError,
    dataset_for,
    input_dtype,
    input_shape,
    load_data,
    load_model,
    num_classes,
)

#: The trained deep models and the held-out set each is measured on.
DEEP = {"resnet20": "digits32", "resnet56": "digits32", "mobilenet": "digits32", "transformer": "digits-tokens"}
#: Floors on held-out accuracy (the README states the measured values; the test checks both).
FLOORS = {"resnet20": 0.97, "resnet56": 0.97, "mobilenet": 0.95, "transformer": 0.88}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_architectures_run_on_their_input_shape(name: str) -> None:
    model = load_model(name)
    assert not model.training
    x, labels = load_data("synthetic", 2, arch=name)
    assert labels is None and tuple(x.shape) == (2, *input_shape(name)) and x.dtype == input_dtype(name)
    with torch.no_grad():
        assert tuple(model(x).shape) == (2, num_classes(name))


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
    a, b = load_model("vgg16"), load_model("vgg16")
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
    from bocompress.worker.zoo.train import train

    a, _ = train("digits-mlp", epochs=1)
    b, _ = train("digits-mlp", epochs=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# --------------------------------------------------------------------------- the deep models


def _readme_accuracy(name: str) -> float:
    """The held-out accuracy (a fraction) the weights README states for ``name``."""
    text = (WEIGHTS_DIR / "README.md").read_text()
    m = re.search(rf"^\| `{re.escape(name)}` \|.*?\| ([0-9.]+)% \|", text, flags=re.M)
    assert m, f"README.md has no table row for {name}"
    return float(m.group(1)) / 100


@pytest.mark.parametrize("name", ["mobilenet", "resnet20", "resnet56", "transformer"])
def test_deep_models_ship_trained_weights(name: str) -> None:
    """Every deep model loads its shipped weights and has the held-out accuracy the README states."""
    from safetensors import safe_open

    path = WEIGHTS_DIR / f"{name}.safetensors"
    assert path.is_file() and path.stat().st_size < 5_000_000
    assert dataset_for(name) == DEEP[name]
    model = load_model(name)
    assert not model.training
    x, y = load_data(DEEP[name], 10_000)
    assert len(x) == 450 and x.dtype == input_dtype(name)
    with torch.no_grad():
        acc = sum(int((model(x[i : i + 150]).argmax(1) == y[i : i + 150]).sum()) for i in range(0, 450, 150)) / 450
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == name and meta["data"] == DEEP[name]
    assert abs(acc - float(meta["test_accuracy"])) < 1e-3, (acc, meta)
    assert abs(acc - _readme_accuracy(name)) < 1.5e-3, acc
    assert acc >= FLOORS[name], acc


def test_digits32_and_tokens_are_views_of_the_digits_split() -> None:
    from bocompress.worker.zoo.data import DIGITS32_MEAN, DIGITS32_STD, TOKEN_LEVELS

    assert {"digits32", "digits32-train", "digits-tokens", "digits-tokens-train"} <= set(DATASETS)
    x8, y8 = load_data("digits", 10_000)
    x32, y32 = load_data("digits32", 10_000)
    tok, yt = load_data("digits-tokens", 10_000)
    assert tuple(x32.shape) == (450, 3, 32, 32) and x32.dtype == torch.float32
    assert tuple(tok.shape) == (450, 64) and tok.dtype == torch.int64
    assert torch.equal(y8, y32) and torch.equal(y8, yt)
    # 3 equal channels, standardized: the background is (0 - mean) / std, the mean over the set near 0
    assert torch.equal(x32[:, 0], x32[:, 1]) and torch.equal(x32[:, 0], x32[:, 2])
    assert float(x32.min()) == pytest.approx(-DIGITS32_MEAN / DIGITS32_STD, abs=1e-6)
    # the bilinear upsample of the 8x8 image (align_corners=False), standardized
    up = torch.nn.functional.interpolate(x8, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(x32[:, :1], (up - DIGITS32_MEAN) / DIGITS32_STD, atol=1e-6)
    # tokens: the 17 grey levels of the 8x8 image
    assert torch.equal(tok, (x8.reshape(450, 64) * 16).round().long())
    assert 0 <= int(tok.min()) and int(tok.max()) <= 16 == TOKEN_LEVELS - 1
    xt, yt_train = load_data("digits32-train", 10_000)
    tt, _ = load_data("digits-tokens-train", 10_000)
    assert len(xt) == len(tt) == 1347 and len(yt_train) == 1347
    # seeded subsets, like digits
    a, la = load_data("digits-tokens", 32, seed=5)
    b, lb = load_data("digits-tokens", 32, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb) and tuple(a.shape) == (32, 64)
    s, none = load_data("synthetic", 3, arch="transformer")
    assert none is None and s.dtype == torch.int64 and int(s.max()) <= 16
    with pytest.raises(ZooError, match="random-init"):
        dataset_for("vgg16")


def test_augmentation_shifts_only_in_training() -> None:
    from bocompress.worker.zoo.data import shift32, shift_tokens

    x, _ = load_data("digits32-train", 8)
    gen = torch.Generator().manual_seed(0)
    sx = shift32(x, gen, 3)
    assert sx.shape == x.shape and not torch.equal(sx, x)
    assert torch.equal(shift32(x, torch.Generator().manual_seed(0), 3), sx)
    # each image is its original translated by at most 3 pixels, the border filled with background
    from bocompress.worker.zoo.data import DIGITS32_MEAN, DIGITS32_STD

    bg = -DIGITS32_MEAN / DIGITS32_STD
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3), value=bg)
    for i in range(len(x)):
        assert any(torch.equal(sx[i], padded[i, :, a : a + 32, b : b + 32]) for a in range(7) for b in range(7)), i
    t, _ = load_data("digits-tokens-train", 8)
    st = shift_tokens(t, torch.Generator().manual_seed(1), 1)
    assert st.dtype == torch.int64 and st.shape == t.shape and int(st.max()) <= 16
    # the sets themselves are never augmented
    assert torch.equal(load_data("digits32-train", 8)[0], x)


def test_mobilenet_and_transformer_structure() -> None:
    from bocompress.worker.zoo.models import BatchNormAct2d, InvertedResidual, SelfAttention

    mb = load_model("mobilenet")
    fused = [m for m in mb.modules() if isinstance(m, BatchNormAct2d)]
    assert fused and all(isinstance(m, torch.nn.BatchNorm2d) for m in fused)
    blocks = [m for m in mb.modules() if isinstance(m, InvertedResidual)]
    assert any(b.use_res for b in blocks) and any(not b.fused for b in blocks) and any(b.fused for b in blocks)
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in mb.modules())
    # the fused module applies its activation: ReLU6 bounds the output to [0, 6]
    bn = fused[0].eval()
    with torch.no_grad():
        out = bn(torch.randn(4, bn.num_features, 5, 5) * 100)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 6.0

    tf = load_model("transformer")
    attn = [m for m in tf.modules() if isinstance(m, SelfAttention)]
    assert len(attn) == 3 and all(isinstance(getattr(a, p), torch.nn.Linear) for a in attn for p in "qkv")
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in tf.modules())
    with pytest.raises(TypeError, match="integer token ids"):
        tf(torch.zeros(2, 64))


# --------------------------------------------------------------------------- through the real worker


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a generator fixture
    """A real service (SQLite) with a client token, for jobs run by the real worker code."""
    from bocompress.client import Client
    from tests.conftest import start_server

    server = start_server(f"sqlite:///{tmp_path_factory.mktemp('zoo') / 'zoo.db'}", scheduler_interval=0.1)
    with Client(server.url, server.token("client", "alice"), timeout=60) as client:
        yield server, client
    server.stop()


@pytest.mark.parametrize(
    ("model", "data", "method"),
    [("transformer", "digits-tokens", {"Linear": "svd"}), ("resnet20", "digits32", {"Conv2d": "tucker2", "Linear": "svd"}),
     ("resnet20", "digits32", "channel_l1")],
)
def test_a_job_on_a_trained_deep_model_profiles_and_runs_a_trial(live, model: str, data: str, method) -> None:  # noqa: ANN001
    """The built-in path end to end: the service accepts the job, the worker profiles the trained model
    with its built-in (integer or float) data, evaluates one trial, and reports the original accuracy."""
    from tests.e2e.helpers import trials, wait_job
    from bocompress.worker.loop import run_worker

    server, client = live
    spec = {"name": f"zoo-{model}-{data}", "objective": {"kind": "scalarized", "kappa": 1.0},
            "compression": {"model": model, "data": data, "method": method, "n_calibration": 64},
            "budget": {"max_trials": 1, "max_parallel": 1}, "optimizer": {"n_initial": 1, "seed": 0, "engine": "sobol"}}
    job = client.create_job(spec)
    assert run_worker(server.url, server.token("worker", "ops"), poll=0.05, max_trials=2) == 2  # profile + 1 trial
    final = wait_job(client, job.id, timeout=60)
    assert final["state"] == "completed", final
    assert final["layers"] and final["search_space"]
    [t] = trials(client, job.id)
    v = t["values"]
    assert t["state"] == "completed" and 0.0 < v["ratio"] <= 1.0 and v["distill_l2"] >= 0.0, t
    assert v["accuracy_original"] >= FLOORS[model] - 0.05, v  # the shipped weights, on their own data

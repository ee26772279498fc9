"""Retraining a found architecture (bocompress.worker.strategies.retrain): the four modes, Scratch-B's epochs, errors, cancel."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bocompress.worker.methods.channel_groups import analyze_channel_groups, execute_prune_plan, prune_plan
from bocompress.worker.strategies import Cancelled, OptionError
from bocompress.worker.strategies.retrain import MODES, RetrainConfig, reinitialize, retrain, scratch_b_epochs
from bocompress.worker.strategies.training import accuracy, flops_per_sample
from bocompress.worker.zoo import load_data, load_model

#: One epoch of each mode (E = 1 for the scratch modes) on 256 training samples.
QUICK = RetrainConfig(epochs=1, original_epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def digits32():
    x, y = load_data("digits32-train", 1347)
    xt, yt = load_data("digits32", 450)
    return (x[:256], y[:256]), (xt, yt)


def _first_half(model, x):
    """``model`` with the second half of every prunable channel group removed (a found architecture)."""
    analysis = analyze_channel_groups(model, x[:1])
    groups = [g for g in analysis.groups if not g.touches_output and not g.problem]
    plan = prune_plan((g, range(max(1, g.size // 2), g.size)) for g in groups)
    return execute_prune_plan(copy.deepcopy(model), plan).eval()


@pytest.fixture(scope="module")
def pair(digits32):
    """``(original, compressed)``: the trained ResNet-20 and its first-half channel pruning."""
    (x, _), _ = digits32
    original = load_model("resnet20")
    return original, _first_half(original, x)


def _changed(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)  # same architecture
    return sum(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_runs_and_changes_weights(pair, digits32, mode):
    original, compressed = pair
    train, (xt, yt) = digits32
    before = copy.deepcopy(compressed.state_dict())
    res = retrain(compressed, original, mode, train, QUICK, val_data=(xt, yt))
    assert _changed(res.model, compressed) > 0
    for k, v in compressed.state_dict().items():  # the input stays as it was
        assert torch.equal(v, before[k])
    assert res.mode == mode and len(res.history) == res.epochs
    assert res.val_accuracy == pytest.approx(accuracy(res.model, xt, yt))
    assert 0 < res.flops_ratio < 1
    print(f"{mode}: {res.epochs} epochs, held-out accuracy {res.val_accuracy:.4f}, {res.seconds:.1f} s")
    if mode.startswith("finetune"):  # starts from the pruned weights: well above chance already
        assert res.val_accuracy > 0.3


def test_finetune_distill_needs_no_labels_and_keeps_zeros(pair, digits32):
    original, compressed = pair
    (x, _), _ = digits32
    sparse = copy.deepcopy(compressed)
    with torch.no_grad():
        w = sparse.layer1[0].conv1.weight
        w[w.abs() < w.abs().median()] = 0.0
    zeros = sparse.layer1[0].conv1.weight == 0
    res = retrain(sparse, original, "finetune-distill", (x[:128], None), QUICK)
    assert bool((res.model.layer1[0].conv1.weight[zeros] == 0).all())  # an unstructured mask survives
    assert _changed(res.model, sparse) > 0


def test_scratch_b_epochs_follow_the_flops_ratio(pair, digits32):
    original, compressed = pair
    (x, y), _ = digits32
    full, pruned = flops_per_sample(original, x[:1]), flops_per_sample(compressed, x[:1])
    want = math.ceil(1 * full / pruned)
    assert want >= 3  # half the channels of every group: about a quarter of the FLOPs
    assert scratch_b_epochs(1, full, pruned) == want
    assert scratch_b_epochs(30, 100.0, 50.0) == 60 and scratch_b_epochs(30, 100.0, 100.0) == 30
    assert scratch_b_epochs(3, 100.0, 40.0) == 8  # 7.5 rounds up: at least the original's compute
    res = retrain(compressed, original, "scratch-b", (x[:64], y[:64]), QUICK)
    assert res.epochs == want and len(res.history) == want
    assert res.flops_ratio == pytest.approx(pruned / full)
    e = retrain(compressed, original, "scratch-e", (x[:64], y[:64]), RetrainConfig(epochs=5, original_epochs=2))
    assert e.epochs == 2


def test_reinitialize_is_seeded_and_fresh(pair):
    _, compressed = pair
    a = reinitialize(copy.deepcopy(compressed), seed=3)
    b = reinitialize(copy.deepcopy(compressed), seed=3)
    c = reinitialize(copy.deepcopy(compressed), seed=4)
    assert _changed(a, b) == 0 and _changed(a, c) > 0 and _changed(a, compressed) > 0
    assert float(a.bn1.weight.detach().min()) == 1.0 and float(a.bn1.running_var.min()) == 1.0


def test_bad_options(pair, digits32):
    original, compressed = pair
    train, _ = digits32
    for field in ("epochs", "original_epochs"):
        for bad in (0, -3):
            with pytest.raises(ValueError, match=field) as info:
                RetrainConfig(**{field: bad})
            assert info.value.field == field
    for mode in ("scratch-e", "scratch-b", "finetune-labels"):
        with pytest.raises(ValueError, match="no labels") as info:
            retrain(compressed, original, mode, (train[0], None), QUICK)
        assert info.value.field == "data"
    with pytest.raises(OptionError, match="unknown mode") as info:
        retrain(compressed, original, "scratch-c", train, QUICK)
    assert info.value.field == "mode"


def test_should_stop_cancels_within_one_step(pair, digits32):
    original, compressed = pair
    train, _ = digits32
    calls, steps = [0], []

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] >= 2

    with pytest.raises(Cancelled, match="retrain scratch-e cancelled at epoch 1, step 1"):
        retrain(compressed, original, "scratch-e", train, QUICK, progress=lambda f, m: steps.append((f, m)),
                should_stop=should_stop)
    assert calls[0] == 2 and len(steps) == 1 and 0 < steps[0][0] < 1

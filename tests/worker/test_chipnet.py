"""ChipNet (bocompress.worker.strategies.chipnet) on the trained zoo models: budgets met, real pruning, errors, cancel."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bocompress.worker.methods.channel_groups import analyze_channel_groups
from bocompress.worker.strategies import Cancelled, OptionError
from bocompress.worker.strategies.chipnet import ChipNetConfig, chipnet
from bocompress.worker.strategies.gates import (
    BUDGET_TYPES,
    BudgetModel,
    continuous_heaviside,
    gated_groups,
    logistic,
    project,
)
from bocompress.worker.strategies.training import accuracy, count_params, flops_per_sample
from bocompress.worker.zoo import load_data, load_model

#: One short soft-pruning epoch on 512 training samples: CPU-cheap, the projection meets the budget.
QUICK = ChipNetConfig(epochs=1, bn_batches=4)
CHANCE = 0.1


@pytest.fixture(scope="module")
def digits32():
    """``(train, val, held_out)``: 512 training samples, 200 others of the training split, the 450 held out."""
    x, y = load_data("digits32-train", 1347)
    xt, yt = load_data("digits32", 450)
    return (x[:512], y[:512]), (x[-200:], y[-200:]), (xt, yt)


@pytest.fixture(scope="module")
def resnet20():
    return load_model("resnet20")


def _measured(model, kind, dense, x):
    if kind == "params":
        return count_params(model) / count_params(dense)
    if kind == "flops":
        return flops_per_sample(model, x) / flops_per_sample(dense, x)
    return None


@pytest.mark.parametrize("budget_type", BUDGET_TYPES)
def test_resnet20_meets_each_budget(resnet20, digits32, budget_type):
    train, val, (xt, yt) = digits32
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    res = chipnet(resnet20, train, val, budget_type, 0.5, QUICK)
    assert abs(res.achieved - 0.5) <= 0.02, res.history
    assert res.ratios[budget_type] == res.achieved
    measured = _measured(res.model, budget_type, resnet20, xt[:2])
    if measured is not None:  # the exact forms equal the pruned model's own count
        assert measured == pytest.approx(res.achieved, abs=1e-9)
    assert res.params == count_params(res.model) < count_params(resnet20)
    assert res.ratios["params"] == pytest.approx(res.params / res.params_dense, abs=1e-9)
    acc = accuracy(res.model, xt, yt)
    print(f"resnet20 {budget_type} 0.5: achieved {res.achieved:.4f}, held-out accuracy {acc:.4f} "
          f"(dense {accuracy(resnet20, xt, yt):.4f}), {res.seconds:.1f} s")
    assert acc > 2 * CHANCE
    assert len(res.history) == 1 and res.history[0]["meets"]
    # the masks describe the pruned model: each group's kept count is its producers' width
    for name, mask in res.masks.items():
        assert res.model.get_submodule(name).out_channels == int(mask.sum()) >= 1
    for k, v in resnet20.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])


def test_mobilenet_flops_budget_from_a_loader(digits32):
    train, val, (xt, yt) = digits32
    model = load_model("mobilenet")
    loader = DataLoader(TensorDataset(*train), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    res = chipnet(model, loader, val, "flops", 0.5, QUICK)
    assert abs(res.achieved - 0.5) <= 0.02
    assert flops_per_sample(res.model, xt[:1]) / flops_per_sample(model, xt[:1]) == pytest.approx(res.achieved, abs=1e-9)
    assert count_params(res.model) < count_params(model)
    acc = accuracy(res.model, xt, yt)
    print(f"mobilenet flops 0.5: achieved {res.achieved:.4f}, held-out accuracy {acc:.4f}")
    assert acc > 2 * CHANCE


def test_budget_model_matches_pruned_models_and_projection(resnet20, digits32):
    """Projected masks of random gates meet every target, exactly measured; the ratio grows with the mask."""
    (x, _), _, _ = digits32
    analysis = analyze_channel_groups(resnet20, x[:1])
    groups = gated_groups(resnet20, analysis)
    bm = BudgetModel(resnet20, analysis, groups)
    gen = torch.Generator().manual_seed(1)
    zetas = [torch.randn(g.size, generator=gen) for g in groups]
    full = torch.tensor([float(g.size) for g in groups], dtype=torch.float64)
    for kind in BUDGET_TYPES:
        assert float(bm.ratio(kind, full)) == pytest.approx(1.0, abs=1e-12)
        last = 0.0
        for target in (0.3, 0.5, 0.7):
            masks = project(zetas, bm, kind, target)
            r = float(bm.ratio(kind, torch.tensor([float(m.sum()) for m in masks], dtype=torch.float64)))
            assert target - 0.02 <= r <= target and r > last
            assert all(m.any() for m in masks)
            last = r


def test_gate_functions_and_paper_schedules():
    z = torch.tensor([0.0, 0.5, 1.0])
    h = continuous_heaviside(z, 2.0)
    assert float(h[0]) == 0.0 and float(h[2]) == pytest.approx(1.0)
    assert float(continuous_heaviside(torch.tensor(0.1), 256.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(logistic(torch.tensor(0.0), 3.0)) == 0.5
    cfg = ChipNetConfig()
    assert (cfg.epochs, cfg.lr, cfg.w_budget, cfg.w_crisp) == (20, 1e-3, 30.0, 10.0)
    assert [cfg.beta(e) for e in (0, 1, 10)] == pytest.approx([1.0, 1.02, 1.2])
    assert cfg.beta(10_000) == 6.0
    assert [cfg.gamma(e) for e in range(6)] == [2.0, 2.0, 4.0, 4.0, 8.0, 8.0]
    assert cfg.gamma(100) == 256.0


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.2, 1.5, math.nan, True])
def test_budget_out_of_range(resnet20, digits32, budget):
    train, val, _ = digits32
    with pytest.raises(ValueError, match="budget") as info:
        chipnet(resnet20, train, val, "params", budget, QUICK)
    assert info.value.field == "budget"


def test_bad_options_name_their_field(resnet20, digits32):
    train, val, _ = digits32
    with pytest.raises(OptionError, match="unknown budget type") as info:
        chipnet(resnet20, train, val, "latency", 0.5, QUICK)
    assert info.value.field == "budget_type"
    with pytest.raises(ValueError, match="BatchNorm") as info:
        chipnet(load_model("digits-cnn"), load_data("digits-train", 64), val, "params", 0.5, QUICK)
    assert info.value.field == "model"
    with pytest.raises(ValueError, match="no labels") as info:
        chipnet(resnet20, (train[0], None), val, "params", 0.5, QUICK)
    assert info.value.field == "train_data"
    for epochs in (0, -1, 1.5):
        with pytest.raises(ValueError, match="epochs") as info:
            ChipNetConfig(epochs=epochs)
        assert info.value.field == "epochs"
    with pytest.raises(ValueError, match="below") as info:  # one channel per group already costs more
        chipnet(resnet20, train, val, "params", 1e-6, QUICK)
    assert info.value.field == "budget"


def test_should_stop_cancels_within_one_step(resnet20, digits32):
    train, val, _ = digits32
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    calls, steps = [0], []

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] >= 3

    with pytest.raises(Cancelled, match="cancelled at epoch 1, step 2") as info:
        chipnet(resnet20, train, val, "flops", 0.5, QUICK, progress=lambda f, m: steps.append(f), should_stop=should_stop)
    assert calls[0] == 3 and len(steps) == 2  # two steps ran, the third never started
    assert info.value.step == 2
    for k, v in resnet20.state_dict().items():
        assert torch.equal(v, before[k])


def test_progress_reaches_one_and_finetune_runs(digits32):
    train, val, _ = digits32
    model = load_model("mobilenet")
    seen: list[float] = []
    res = chipnet(model, (train[0][:128], train[1][:128]), val, "channels", 0.6,
                  ChipNetConfig(epochs=1, finetune_epochs=1, bn_batches=2), progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and 0.0 < seen[0] < 1.0
    assert res.val_accuracy_finetuned is not None and abs(res.achieved - 0.6) <= 0.02

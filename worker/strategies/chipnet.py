"""ChipNet: budget-aware soft channel pruning (Tiwari et al., ICLR 2021), as plain torch code.

One gate ``zeta`` per channel of every prunable BatchNorm channel group (the dependency groups of
:func:`bocompress.worker.methods.channel_groups.analyze_channel_groups`: a convolution's output channels, its
BatchNorm and every consumer; in a residual network every convolution tied to the same sum). The
gate multiplies the output of every BatchNorm of its group (for a fused norm+activation module with
an ``act`` child, such as ``BatchNormAct2d``, the input of that activation, so the product stays a
pure scaling of the BatchNorm's affine output), as

* the logistic ``z~ = 1 / (1 + exp(-beta * zeta))`` and
* the continuous Heaviside ``z = 1 - exp(-gamma * z~) + z~ * exp(-gamma)``.

The loss is ``CE + w_budget * (V(z) - V0)^2 + w_crisp * mean((z~ - z)^2)`` with ``V`` one of four
budgets, each a ratio to the dense model computed exactly from the model's shapes (one traced
forward pass gives the spatial sizes; :func:`bocompress.worker.methods.channel_base.build_cost_table` gives
closed forms that are products of kept counts, evaluated here with the soft counts ``sum(z)``):

* ``channels``: output channels of the prunable Conv/Linear layers;
* ``activation``: the same, times each layer's output positions (activation volume);
* ``params``: the whole model's parameter count (``numel``, BatchNorm affine included);
* ``flops``: the whole model's FLOPs per sample, as :class:`torch.utils.flop_counter.FlopCounterMode`
  counts them (2 per multiply-accumulate of convolutions and matrix products).

Schedules (the paper's defaults, :class:`ChipNetConfig`): ``beta`` from 1, ``+0.02`` per epoch, at most
6; ``gamma`` from 2, doubled every 2 epochs, at most 256; AdamW at 1e-3 on weights and gates (weight
decay 1e-3 on the weights, none on the gates, as in the authors' code), gates initialised at
``U(0, 0.01)``.

After every epoch the network is hard-pruned and validated; the best validation accuracy among the
epochs whose hard-pruned model meets the budget is kept, and optionally fine-tuned.

**Hard pruning and the projection step.** A channel is kept when its gate ``z > 0.5`` (the paper's
rule). When that mask's exact budget ratio is not within ``tolerance`` (0.02) of the target -- which
happens whenever the gates have not become crisp, e.g. after the few epochs a small CPU run can
afford -- the mask is *projected*: channels are ranked by ``zeta`` (the order of ``z``), every group's
best channel is always kept (no group is ever emptied), and the longest prefix of the ranking whose
exact ratio is ``<= V0`` is kept (found by bisection: the ratio only grows as channels are added).
The authors' code does the same in spirit: it picks the hard threshold as a quantile of the gates
that meets the budget. Each epoch's history says which rule it used (``"threshold"`` or
``"projected"``). The kept channels' gate values are folded into their BatchNorms' affine
parameters, so the pruned network computes exactly what the gated network computed with the removed
channels' gates set to zero.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bocompress.worker.methods.base import CompressionError
from bocompress.worker.methods.channel_groups import analyze_channel_groups
from bocompress.worker.strategies.gates import (
    BUDGET_TYPES,
    BudgetModel,
    Gates,
    continuous_heaviside,
    gated_groups,
    hard_prune,
    kept_counts,
    logistic,
    project,
)
from bocompress.worker.strategies.training import (
    Data,
    OptionError,
    Progress,
    ShouldStop,
    Ticker,
    TrainData,
    accuracy,
    check_positive_int,
    count_params,
    decay_groups,
    recalibrate_bn,
)

__all__ = [
    "BUDGET_TYPES",
    "BudgetModel",
    "ChipNetConfig",
    "ChipNetResult",
    "Gates",
    "chipnet",
    "continuous_heaviside",
    "logistic",
]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class ChipNetConfig:
    """ChipNet's options; the defaults are the paper's (Tiwari et al. 2021, section 4 and code).

    Attributes:
        epochs: epochs of soft pruning (paper: 20); every epoch ends with a hard prune + validation.
        lr: AdamW learning rate of weights and gates (paper: 1e-3).
        gate_lr: the gates' learning rate (None: ``lr``, the paper's). With Adam a gate moves by
            about ``lr`` per step, so on a small training set (1347 digits: 36-42 steps an epoch) the
            paper's 1e-3 moves it by ~0.04 an epoch: the gates never become crisp and every epoch's
            hard mask comes from the projection step. On ResNet-20, 20 epochs at a params budget of
            0.5 gave held-out accuracy 0.46 before fine-tuning with 1e-3 and 0.996 with 0.05
            (``bench/chipnet_budgets.py --epochs 20 --gate-lr 0.05``).
        weight_decay: AdamW weight decay of the weights (dim > 1); gates and norms have none.
        batch_size: batch size when the training data are tensors (authors' code: 32).
        w_budget: weight of the budget loss ``(V(z) - V0)^2`` (paper: 30).
        w_crisp: weight of the crispness loss ``mean((z~ - z)^2)`` (paper: 10).
        beta0, beta_step, beta_max: ``beta`` of epoch ``e`` (0-based) is ``min(beta0 + e * beta_step, beta_max)``.
        gamma0, gamma_factor, gamma_every, gamma_max: ``gamma`` of epoch ``e`` is
            ``min(gamma0 * gamma_factor ** (e // gamma_every), gamma_max)``.
        zeta_init: gates start at ``U(0, zeta_init)`` (authors' code: 0.01).
        bn_batches: training batches the hard-pruned model's BatchNorm statistics are re-estimated
            on before it is validated (0: keep the gated network's running statistics).
        tolerance: the hard-pruned ratio meets the budget when ``|V - V0| <= tolerance``.
        finetune_epochs: label fine-tuning of the kept hard-pruned model (0: none).
        finetune_lr: its AdamW learning rate.
        seed: seeds the gates' init and the batch order.
    """

    epochs: int = 20
    lr: float = 1e-3
    gate_lr: float | None = None
    weight_decay: float = 1e-3
    batch_size: int = 32
    w_budget: float = 30.0
    w_crisp: float = 10.0
    beta0: float = 1.0
    beta_step: float = 0.02
    beta_max: float = 6.0
    gamma0: float = 2.0
    gamma_factor: float = 2.0
    gamma_every: int = 2
    gamma_max: float = 256.0
    zeta_init: float = 0.01
    bn_batches: int = 8
    tolerance: float = 0.02
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("gamma_every", self.gamma_every)
        if isinstance(self.finetune_epochs, bool) or int(self.finetune_epochs) != self.finetune_epochs or self.finetune_epochs < 0:
            raise OptionError("finetune_epochs", f"must be an integer >= 0, got {self.finetune_epochs!r}")
        if isinstance(self.bn_batches, bool) or int(self.bn_batches) != self.bn_batches or self.bn_batches < 0:
            raise OptionError("bn_batches", f"must be an integer >= 0, got {self.bn_batches!r}")
        for name in ("lr", "finetune_lr", "beta0", "gamma0", "gamma_factor", "gamma_max", "beta_max"):
            if not float(getattr(self, name)) > 0:
                raise OptionError(name, f"must be > 0, got {getattr(self, name)!r}")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise OptionError("gate_lr", f"must be > 0, got {self.gate_lr!r}")
        for name in ("weight_decay", "w_budget", "w_crisp", "beta_step", "zeta_init", "tolerance"):
            if float(getattr(self, name)) < 0:
                raise OptionError(name, f"must be >= 0, got {getattr(self, name)!r}")

    def beta(self, epoch: int) -> float:
        """``beta`` during epoch ``epoch`` (0-based)."""
        return min(self.beta0 + epoch * self.beta_step, self.beta_max)

    def gamma(self, epoch: int) -> float:
        """``gamma`` during epoch ``epoch`` (0-based)."""
        return min(self.gamma0 * self.gamma_factor ** (epoch // self.gamma_every), self.gamma_max)


# --------------------------------------------------------------------------- budgets


@dataclass
class ChipNetResult:
    """What :func:`chipnet` returns.

    Attributes:
        model: the hard-pruned model (channels physically removed; eval mode), fine-tuned when asked.
        hard_model: the kept epoch's hard-pruned model before any fine-tuning (``model`` without one).
        masks: per gated group (named after its first producing Conv), a bool tensor of its channels:
            True = kept (in the original model's channel order).
        budget_type: the budget measured.
        budget: the target ratio ``V0``.
        achieved: the exact ratio of ``budget_type`` of ``model`` to the dense model.
        ratios: the exact ratios of all four budgets of ``model``.
        params: parameters of ``model`` (and ``params_dense`` of the input model).
        val_accuracy: validation accuracy of the kept epoch's hard-pruned model (before fine-tuning).
        val_accuracy_finetuned: after fine-tuning (None without).
        best_epoch: the kept epoch (0-based).
        history: one dict per epoch: ``epoch``, ``beta``, ``gamma``, ``loss``, ``ce``, ``budget_loss``,
            ``crisp_loss`` (training means), ``soft_ratio`` (``V(z)`` at the epoch's end), ``rule``
            (``threshold`` or ``projected``), ``ratio`` (hard), ``kept`` channels, ``meets``,
            ``val_accuracy``, ``seconds``.
        seconds: wall time of the whole call.
    """

    model: nn.Module
    hard_model: nn.Module
    masks: dict[str, Tensor]
    budget_type: str
    budget: float
    achieved: float
    ratios: dict[str, float]
    params: int
    params_dense: int
    val_accuracy: float
    val_accuracy_finetuned: float | None
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- the run


def _check_budget(budget_type: str, budget: float) -> float:
    if budget_type not in BUDGET_TYPES:
        raise OptionError("budget_type", f"unknown budget type {budget_type!r}; known: {list(BUDGET_TYPES)}")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0.0 < float(budget) < 1.0:
        raise OptionError("budget", f"must be a ratio strictly between 0 and 1, got {budget!r}")
    return float(budget)


def chipnet(
    model: nn.Module,
    train_data: Data,
    val_data: tuple[Tensor, Tensor],
    budget_type: str,
    budget: float,
    config: ChipNetConfig | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> ChipNetResult:
    """Prune ``model`` to a budget with ChipNet (soft gates, then a hard prune per epoch).

    Args:
        model: a trained network with BatchNorm (left untouched: the work is on a copy).
        train_data: labelled training data: ``(inputs, labels)`` tensors or an iterable of
            ``(inputs, labels)`` batches.
        val_data: ``(inputs, labels)`` tensors the hard-pruned model is validated (and selected) on.
        budget_type: ``channels``, ``activation``, ``params`` or ``flops``.
        budget: the target ratio ``V0``, strictly between 0 and 1.
        config: the options (paper defaults).
        progress: ``progress(frac, message)`` after every step.
        should_stop: checked before every step; True stops the run with :class:`Cancelled`.

    Returns:
        The :class:`ChipNetResult`; its model meets the budget: ``|achieved - budget| <= tolerance``
        (the projection step makes it ``<= budget`` whenever the paper's 0.5 threshold misses).

    Raises:
        OptionError: (a ValueError) bad ``budget`` / ``budget_type`` / config, a model without a
            prunable BatchNorm channel group, training data without labels, validation data that
            are not labelled tensors, or a budget below what one channel per group costs.
        Cancelled: ``should_stop()`` returned True.
    """
    t_start = time.perf_counter()
    cfg = config or ChipNetConfig()
    if not isinstance(cfg, ChipNetConfig):
        raise OptionError("config", f"must be a ChipNetConfig, got {type(cfg).__name__}")
    target = _check_budget(budget_type, budget)
    if not any(isinstance(m, _BN) for m in model.modules()):
        raise OptionError("model", f"{type(model).__name__} has no BatchNorm: ChipNet gates BatchNorm channels")
    data = TrainData(train_data, cfg.batch_size, cfg.seed, field="train_data")
    data.require_labels("ChipNet")
    if not (isinstance(val_data, tuple | list) and len(val_data) == 2 and all(isinstance(v, Tensor) for v in val_data)):
        raise OptionError("val_data", "must be (inputs, labels) tensors")
    x_val, y_val = val_data
    if len(x_val) == 0 or len(x_val) != len(y_val):
        raise OptionError("val_data", f"inputs and labels must be non-empty and of one length, got {len(x_val)} and {len(y_val)}")

    device = next(model.parameters()).device
    work = copy.deepcopy(model)
    try:
        analysis = analyze_channel_groups(work, data.example.to(device))
    except CompressionError as exc:
        raise OptionError("model", str(exc)) from exc
    groups = gated_groups(work, analysis)
    if not groups:
        raise OptionError("model", "no prunable BatchNorm channel group (every BatchNorm reaches the output or an unsupported layer)")
    budget_model = BudgetModel(work, analysis, groups)
    floor = float(budget_model.ratio(budget_type, torch.ones(len(groups), dtype=torch.float64)))
    if floor > target:
        raise OptionError("budget", f"{target} is below {floor:.4f}, the {budget_type} ratio of one channel per group")

    gen = torch.Generator().manual_seed(int(cfg.seed))
    gates = Gates(work, groups, cfg.zeta_init, gen).to(device)
    params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
    opt_groups = decay_groups(params, cfg.weight_decay)
    opt_groups.append({"params": list(gates.zetas), "weight_decay": 0.0, "lr": cfg.gate_lr or cfg.lr})
    opt = torch.optim.AdamW(opt_groups, lr=cfg.lr)

    per_epoch = data.steps_per_epoch() or 1
    ft_steps = cfg.finetune_epochs * per_epoch
    ticker = Ticker("chipnet", cfg.epochs * per_epoch + ft_steps, progress, should_stop)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, nn.Module, list[Tensor], float] | None = None
    dense_params = count_params(model)

    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        gates.beta, gates.gamma = cfg.beta(epoch), cfg.gamma(epoch)
        sums = {"loss": 0.0, "ce": 0.0, "budget_loss": 0.0, "crisp_loss": 0.0}
        steps = 0
        work.train()
        gates.attach()
        try:
            for step, (xb, yb) in enumerate(data.epoch()):
                ticker.check(epoch, step)
                gates.new_step()
                zs = gates.step_z()
                soft = budget_model.ratio(budget_type, torch.stack([z.sum() for z in zs]))
                ce = F.cross_entropy(work(xb.to(device)), yb.to(device))
                b_loss = (soft - target).pow(2).float()
                c_loss = gates.crispness()
                loss = ce + cfg.w_budget * b_loss + cfg.w_crisp * c_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                for k, v in (("loss", loss), ("ce", ce), ("budget_loss", b_loss), ("crisp_loss", c_loss)):
                    sums[k] += float(v.detach())
                ticker.step(f"soft pruning epoch {epoch + 1}/{cfg.epochs}: loss {float(loss.detach()):.4f}, "
                            f"V(z) {float(soft.detach()):.3f} (target {target})")
        finally:
            gates.detach()
            gates.new_step()
        ticker.check(epoch, steps)

        with torch.no_grad():
            zs = [z.detach().cpu() for z in gates.all_z()]
            soft_ratio = float(budget_model.ratio(budget_type, torch.stack([z.sum() for z in zs])))
            masks = [z > 0.5 for z in zs]
            for gi, m in enumerate(masks):
                if not bool(m.any()):
                    m[int(torch.argmax(zs[gi]))] = True
            rule = "threshold"
            ratio = float(budget_model.ratio(budget_type, kept_counts(masks)))
            if abs(ratio - target) > cfg.tolerance:
                masks = project([z.detach().cpu() for z in gates.zetas], budget_model, budget_type, target)
                rule = "projected"
                ratio = float(budget_model.ratio(budget_type, kept_counts(masks)))
        pruned = hard_prune(work, gates, masks)
        if cfg.bn_batches:
            recalibrate_bn(pruned, _first_batches(data, cfg.bn_batches, ticker, epoch), device)
        acc = accuracy(pruned, x_val.to(device), y_val.to(device))
        meets = abs(ratio - target) <= cfg.tolerance or ratio <= target
        history.append({
            "epoch": epoch, "beta": gates.beta, "gamma": gates.gamma,
            **{k: v / max(1, steps) for k, v in sums.items()},
            "soft_ratio": soft_ratio, "rule": rule, "ratio": ratio, "kept": int(sum(int(m.sum()) for m in masks)),
            "meets": meets, "val_accuracy": acc, "seconds": time.perf_counter() - t_epoch,
        })
        ticker.report(f"epoch {epoch + 1}/{cfg.epochs}: hard-pruned ({rule}) {budget_type} ratio {ratio:.4f}, "
                      f"validation accuracy {acc:.4f}")
        if meets and (best is None or acc > best[0]):
            best = (acc, epoch, pruned, [m.clone() for m in masks], ratio)

    if best is None:  # pragma: no cover - the projection always meets the budget
        raise CompressionError("no epoch's hard-pruned model met the budget")
    acc, best_epoch, pruned, masks, ratio = best
    acc_ft = None
    hard = pruned
    if cfg.finetune_epochs:
        pruned = _finetune(pruned, data, cfg, ticker, device)
        acc_ft = accuracy(pruned, x_val.to(device), y_val.to(device))
    counts = kept_counts(masks)
    ratios = {k: float(budget_model.ratio(k, counts)) for k in BUDGET_TYPES}
    ticker.done = ticker.total
    ticker.report(f"done: {budget_type} ratio {ratio:.4f} (target {target}), validation accuracy {acc_ft if acc_ft is not None else acc:.4f}")
    return ChipNetResult(
        model=pruned.eval(),
        hard_model=hard.eval(),
        masks={g.name: m for g, m in zip(groups, masks)},
        budget_type=budget_type,
        budget=target,
        achieved=ratios[budget_type],
        ratios=ratios,
        params=count_params(pruned),
        params_dense=dense_params,
        val_accuracy=acc,
        val_accuracy_finetuned=acc_ft,
        best_epoch=best_epoch,
        history=history,
        seconds=time.perf_counter() - t_start,
    )


def _first_batches(data: TrainData, n: int, ticker: Ticker, epoch: int) -> Iterator[Tensor]:
    """The inputs of up to ``n`` training batches (cancel checked before each)."""
    for i, (xb, _) in enumerate(data.epoch()):
        if i >= n:
            return
        ticker.check(epoch, i)
        yield xb


def _finetune(model: nn.Module, data: TrainData, cfg: ChipNetConfig, ticker: Ticker, device: torch.device) -> nn.Module:
    """Label fine-tuning of the hard-pruned model (AdamW, ``finetune_lr``) on a copy."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(decay_groups(list(model.named_parameters()), cfg.weight_decay), lr=cfg.finetune_lr)
    for epoch in range(cfg.finetune_epochs):
        model.train()
        for step, (xb, yb) in enumerate(data.epoch()):
            ticker.check(cfg.epochs + epoch, step)
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ticker.step(f"fine-tuning epoch {epoch + 1}/{cfg.finetune_epochs}: loss {float(loss.detach()):.4f}")
    return model.eval()

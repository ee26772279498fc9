"""The black box of ``bench/compression_quality.py``: one (model, method, budget) cell, its
measurements and fine-tunes cached, and the cache of the cell in progress.

A :class:`Cell` loads a zoo model and its calibration and held-out data, applies theta with the
worker's compressor (``bocompress.worker.methods.build_compressor``), re-estimates BatchNorm, and measures L
(cached by the kept counts of theta) and the held-out accuracy before and after a fixed
distillation fine-tune (cached too). :func:`ensure_signals` measures the per-layer sensitivity
curves a profile lacks; :func:`get_cell` keeps one model in memory across a cell's budgets.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bocompress.costs import kept, ratio

#: Calibration images (of the zoo model's training split) for BN re-estimation, L and the fine-tune
#: (``--calibration`` of compression_quality.py sets it before the first cell).
N_CALIBRATION = 128
#: The fixed fine-tune's Adam learning rate (batch 32 on the calibration inputs).
FT_LR = 3e-4
#: The theta of each point of a sensitivity curve that :func:`ensure_signals` measures.
SENS_GRID = (0.1, 0.3, 0.55, 0.8)


def method_spec(model: str, method: str) -> Any:
    """The compressor's method argument for a method label."""
    if method == "lowrank":
        return "svd" if model == "transformer" else {"Conv2d": "tucker2", "Linear": "svd"}
    return method


# --------------------------------------------------------------------------- the black box


def bn_recalibrate(model: nn.Module, x: torch.Tensor, batch: int = 128) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x`` (cumulative average), in place: the
    worker's :func:`~bocompress.worker.strategies.training.recalibrate_bn`, which puts each BatchNorm's
    momentum back afterwards (a model trained later, e.g. from scratch, must not keep averaging its whole
    training into its statistics)."""
    from bocompress.worker.strategies.training import recalibrate_bn

    with torch.no_grad():
        recalibrate_bn(model, (x[i : i + batch] for i in range(0, len(x), batch)))


def _outputs(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).float().flatten(1) for i in range(0, len(x), batch)])


@dataclass
class Cell:
    """One (model, method, budget) problem and its black box."""

    model_name: str
    method: str
    budget: float
    device: str = "cpu"
    bn: bool = True
    ft_steps: int = 100
    cache: dict[tuple, dict[str, float]] = field(default_factory=dict)
    #: The network to compress instead of the zoo's ``model_name`` (e.g. a fine-tuned compressed one);
    #: ``model_name`` still names its data.
    module: nn.Module | None = None
    #: The compressor's layer patterns (``compression.layers``).
    layers: Any = ("*",)
    #: The cost R is measured in (``params``, ``flops``, ``channels``, ``activation``).
    cost: str = "params"
    #: The method argument of the compressor (default: :func:`method_spec` of the label).
    spec: Any = None

    def __post_init__(self) -> None:
        from bocompress.worker.methods import CompressorOptions, build_compressor
        from bocompress.worker.zoo import load_data, load_model

        data = _dataset_for(self.model_name)
        base = self.module if self.module is not None else load_model(self.model_name)
        self.model = base.to(self.device).eval()
        x_cal, y_cal = load_data(f"{data}-train", N_CALIBRATION)
        x_test, y_test = load_data(data, 450)
        self.x_cal = x_cal.to(self.device)
        self.y_cal = y_cal.to(self.device) if y_cal is not None else None
        self.x_test, self.y_test = x_test.to(self.device), y_test.to(self.device)
        spec = self.spec if self.spec is not None else method_spec(self.model_name, self.method)
        # as the worker builds it: the job's cost, the calibration inputs for the least-squares steps
        self.comp = build_compressor(self.model, spec, list(self.layers), 0.05, self.x_cal[:8],
                                     CompressorOptions(cost_kind=self.cost, calib_inputs=self.x_cal))
        self.profile = copy.deepcopy(self.comp.profile())
        self.params = [dict(p) for p in self.profile["params"]]
        self.t_cal = _outputs(self.model, self.x_cal).double()
        self.denom = float(self.t_cal.pow(2).sum(1).mean())
        self.acc_original = self._accuracy(self.model)
        self.evals = 0
        self.eval_seconds = 0.0
        #: Fine-tune results by (kept counts, bn): a point two optimizers found is fine-tuned once.
        self.ft_cache: dict[tuple, dict[str, float]] = {}
        #: The smallest R the search space allows (every parameter at its lower bound).
        self.min_ratio = float(ratio(self.profile, {p["name"]: float(p["low"]) for p in self.params}, self.cost))

    @property
    def name(self) -> str:
        return f"{self.model_name}/{self.method}/R<={self.budget}"

    def key(self, theta: dict[str, float]) -> tuple:
        return tuple(kept(float(theta[p["name"]]), int(p["size"])) if p.get("size") else round(theta[p["name"]], 6)
                     for p in self.params)

    def _accuracy(self, model: nn.Module) -> float:
        out = _outputs(model, self.x_test)
        return float((out.argmax(1) == self.y_test).float().mean())

    def _build(self, theta: dict[str, float], bn: bool) -> nn.Module:
        m = self.comp.apply(theta).to(self.device)
        if bn:
            bn_recalibrate(m, self.x_cal)
        return m.eval()

    def _l(self, m: nn.Module) -> tuple[float, float]:
        return self._l_err(m)[:2]

    def _l_err(self, m: nn.Module) -> tuple[float, float, float]:
        """L, its standard error, and the top-1 error on the labelled calibration inputs (NaN without labels)."""
        out = _outputs(m, self.x_cal).double()
        err = (out - self.t_cal).pow(2).sum(1)
        top1 = float((out.argmax(1) != self.y_cal).double().mean()) if self.y_cal is not None else math.nan
        return float(err.mean()) / self.denom, float(err.std()) / math.sqrt(len(err)) / self.denom, top1

    def measure(self, theta: dict[str, float]) -> dict[str, float]:
        """``{"L", "sem", "err", "R", "feasible"}`` of theta (cached by kept counts); ``err`` is the top-1
        error on the labelled calibration inputs."""
        k = self.key(theta)
        if k not in self.cache:
            t0 = time.perf_counter()
            L, sem, top1 = self._l_err(self._build(theta, self.bn))
            self.cache[k] = {"L": L, "sem": sem, "err": top1}
            self.evals += 1
            self.eval_seconds += time.perf_counter() - t0
        R = float(ratio(self.profile, theta, self.cost))
        return {**self.cache[k], "R": R, "feasible": float(R <= self.budget + 1e-12)}

    def finetune(self, theta: dict[str, float], bn: bool | None = None) -> dict[str, float]:
        """Held-out accuracy before and after the fixed distillation fine-tune, and L after it."""
        bn = self.bn if bn is None else bn
        fk = (self.key(theta), bn)
        if fk not in self.ft_cache:
            self.ft_cache[fk] = self._finetune(theta, bn)
        return dict(self.ft_cache[fk])

    def _finetune(self, theta: dict[str, float], bn: bool) -> dict[str, float]:
        return self.finetune_model(self._build(theta, bn), bn)

    def finetune_model(self, m: nn.Module, bn: bool | None = None) -> dict[str, float]:
        """:meth:`finetune` of a compressed model built elsewhere (fine-tuned in place): the same fixed
        distillation fine-tune and the same measurements."""
        bn = self.bn if bn is None else bn
        before = self._accuracy(m)
        L_before = self._l(m)[0]
        g = torch.Generator().manual_seed(0)
        params = [p for p in m.parameters() if p.requires_grad]
        # Pruned weights stay pruned: a magnitude-pruned model must keep its sparsity (its R).
        masks = [(p, p.detach() != 0) for p in params if bool((p.detach() == 0).any())]
        opt = torch.optim.Adam(params, lr=FT_LR)
        t_cal = self.t_cal.float()
        m.train()
        for _ in range(self.ft_steps):
            idx = torch.randint(0, len(self.x_cal), (32,), generator=g).to(self.device)
            loss = (m(self.x_cal[idx]).float().flatten(1) - t_cal[idx]).pow(2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, keep in masks:
                    p.mul_(keep)
        if bn:
            bn_recalibrate(m, self.x_cal)
        m.eval()
        return {"acc_before": before, "acc_after": self._accuracy(m), "L_before": L_before, "L_after": self._l(m)[0]}


def _dataset_for(model: str) -> str:
    from bocompress.worker import zoo

    if hasattr(zoo, "dataset_for"):
        return str(zoo.dataset_for(model))
    return "digits" if model.startswith("digits") else "digits32"


def ensure_signals(cell: Cell) -> dict[str, float]:
    """Give every layer of the cell's profile the per-layer ``sensitivity`` curve if it lacks one.

    Same definition as the worker's (interface.md): L of the model with only this parameter
    compressed to ``t`` (the others dense), BN re-estimated. Returns what it cost.
    """
    t0 = time.perf_counter()
    n0 = cell.evals
    layers = {layer["name"]: layer for layer in cell.profile["layers"]}
    dense = {p["name"]: 1.0 for p in cell.params}
    measured = 0
    for p in cell.params:
        layer = layers.get(p["name"]) or next((lay for lay in cell.profile["layers"] if lay["params"] == [p["name"]]),
                                               None)
        if layer is None:
            continue
        sig = dict(layer.get("signals") or {})
        if sig.get("sensitivity"):
            continue
        grid = [t for t in SENS_GRID if t >= p["low"]]
        sens = [cell.measure({**dense, p["name"]: t})["L"] for t in grid]
        sig["sens_grid"], sig["sensitivity"] = grid, sens
        if "grid" not in sig:
            sig["grid"] = grid + [1.0]
        layer["signals"] = sig
        measured += 1
    return {"layers": measured, "evals": cell.evals - n0, "seconds": time.perf_counter() - t0}


#: The cell of the (model, method) in progress: its budgets share the black box, its measurement and
#: fine-tune caches and the sensitivity curves (one model in memory at a time).
_CELLS: dict[tuple, Cell] = {}


def get_cell(model: str, method: str, budget: float, device: str, bn: bool, ft_steps: int) -> Cell:
    """The cell of (model, method) at ``budget``: the one in memory when it matches, else a new one."""
    k = (model, method, device, bn, ft_steps)
    if k not in _CELLS:
        _CELLS.clear()
        _CELLS[k] = Cell(model, method, budget, device=device, bn=bn, ft_steps=ft_steps)
    cell = _CELLS[k]
    cell.budget = budget
    return cell

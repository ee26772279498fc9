"""Study 5 (Tiwari et al., ICLR 2021): BO vs ChipNet at equal budget, for each budget type.

On ResNet-20 and each budget type (``channels``, ``activation``, ``params``, ``flops``) at 0.5:

- **BO**: the product's constrained search with ``channel_l1`` (``min L s.t. cost ratio <= 0.5``,
  the cost in that budget's kind, from the layer table), no training;
- **ChipNet**: the product's ChipNet (``bocompress.worker.strategies.chipnet``: soft gates, crispness
  and budget losses, the paper's schedules) trained with labels on the training digits
  (``--chipnet-epochs`` soft-pruning epochs; the paper: 20; the gates' lr 0.05, see docs/strategies.md),
  the last 200 of them for its per-epoch model selection;

then both results get the same fixed distillation fine-tune. Reported: the ratio each achieved in
the budget's kind (each by its own exact count: the layer table for BO, ChipNet's budget model for
ChipNet) and in parameters, L, held-out accuracy before/after the fine-tune, wall time.
"""

from __future__ import annotations

import time
from typing import Any

from bench.paper.common import log, search
from bench.quality_cells import Cell

MODEL = "resnet20"
KINDS = ("channels", "activation", "params", "flops")
N_VAL = 200


def run(budget: float = 0.5, trials: int = 24, chipnet_epochs: int = 5, seed: int = 0,
        kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    from bocompress.worker.strategies.chipnet import ChipNetConfig, chipnet
    from bocompress.worker.strategies.training import count_params
    from bocompress.worker.zoo import load_data

    x, y = load_data("digits32-train", 1347)
    train, val = (x[:-N_VAL], y[:-N_VAL]), (x[-N_VAL:], y[-N_VAL:])
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        cell = Cell(MODEL, "channel_l1", budget, cost=kind)
        dense_params = count_params(cell.model)
        bo = search(cell, "bo", seed, trials)
        m = cell._build(bo["theta"], True)
        rows.append({"kind": kind, "strategy": "BO", "ratio": bo["R"], "params_ratio": count_params(m) / dense_params,
                     "L": bo["L"], "acc_before": bo["acc_before"], "acc_after": bo["acc_after"],
                     "seconds": bo["seconds"]})
        t0 = time.perf_counter()
        res = chipnet(cell.model, train, val, kind, budget,
                      ChipNetConfig(epochs=chipnet_epochs, gate_lr=0.05, seed=seed))
        seconds = time.perf_counter() - t0
        pruned = res.hard_model.eval()
        L = cell._l(pruned)[0]
        acc_before = cell._accuracy(pruned)
        ft = cell.finetune_model(pruned)
        rows.append({"kind": kind, "strategy": "ChipNet", "ratio": res.achieved,
                     "params_ratio": res.params / res.params_dense, "L": L, "acc_before": acc_before,
                     "acc_after": ft["acc_after"], "seconds": seconds})
        for r in rows[-2:]:
            log(f"  {kind}<={budget} {r['strategy']}: ratio {r['ratio']:.3f} L={r['L']:.4g} "
                f"acc {r['acc_before']:.3f} -> {r['acc_after']:.3f} ({r['seconds']:.0f} s)")
    return {"model": MODEL, "budget": budget, "rows": rows, "trials": trials, "chipnet_epochs": chipnet_epochs,
            "acc_original": cell.acc_original}

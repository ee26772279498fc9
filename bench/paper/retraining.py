"""Study 4 (Liu et al., ICLR 2019): fine-tune vs Scratch-E vs Scratch-B for a found architecture.

Two architectures of ResNet-20 at the same R (``channel_l1``, R <= 0.25 in parameters): the one BO
finds (``min L s.t. R <= 0.25``) and uniform pruning (one keep-ratio for every layer). Each is then

- **fine-tuned** with labels (SGD, lr 1e-3, ``--finetune-epochs``; Liu et al.: 40 epochs at 1e-3),
- trained from random init for the original's epochs E (**Scratch-E**; the zoo's ResNet-20 recipe:
  E = 30), and
- from random init for the original's compute (**Scratch-B**: ``ceil(E * F_full / F_pruned)`` epochs),

with the product's retraining code (``bocompress.worker.strategies.retrain``, the export option
``retrain``), on the 1347 training digits; accuracy on the 450 held-out digits.
"""

from __future__ import annotations

import time
from typing import Any

from bench.paper.common import log, search
from bench.quality_cells import Cell

MODEL = "resnet20"


def run(budget: float = 0.25, trials: int = 24, original_epochs: int = 30, finetune_epochs: int = 10,
        seed: int = 0) -> dict[str, Any]:
    from bocompress.worker.strategies.retrain import RetrainConfig, retrain
    from bocompress.worker.strategies.training import accuracy
    from bocompress.worker.zoo import load_data

    cell = Cell(MODEL, "channel_l1", budget)
    x_tr, y_tr = load_data("digits32-train", 1347)
    rows: list[dict[str, Any]] = []
    for opt in ("bo", "uniform"):
        found = search(cell, opt, seed, trials)
        pruned = cell._build(found["theta"], True)
        base = {"architecture": "BO" if opt == "bo" else "uniform", "R": found["R"], "L": found["L"],
                "acc_pruned": found["acc_before"], "search_seconds": found["seconds"]}
        for mode, epochs in (("finetune-labels", finetune_epochs), ("scratch-e", original_epochs),
                             ("scratch-b", original_epochs)):
            t0 = time.perf_counter()
            cfg = RetrainConfig(epochs=epochs, original_epochs=original_epochs, seed=seed)
            res = retrain(pruned, cell.model, mode, (x_tr, y_tr), cfg)
            row = {**base, "mode": mode, "epochs": res.epochs, "flops_ratio": res.flops_ratio,
                   "acc": accuracy(res.model, cell.x_test, cell.y_test), "seconds": time.perf_counter() - t0}
            rows.append(row)
            log(f"  retraining {row['architecture']} R={row['R']:.3f} {mode} ({res.epochs} epochs): "
                f"held-out {row['acc']:.4f} ({row['seconds']:.0f} s)")
    return {"model": MODEL, "budget": budget, "rows": rows, "acc_original": cell.acc_original,
            "original_epochs": original_epochs, "finetune_epochs": finetune_epochs, "trials": trials}

"""Study 4 (Liu et al., ICLR 2019): fine-tune vs Scratch-E vs Scratch-B for a found architecture.

Per model, two architectures at the same R (``channel_l1``, R <= 0.25 in parameters): the one BO
finds (``min L s.t. R <= 0.25``) and uniform pruning (one keep-ratio for every layer). When BO's best
is the uniform point itself, the architecture is trained once. Each is then

- **fine-tuned** with labels (SGD, lr 1e-3, ``--finetune-epochs``; Liu et al.: 40 epochs at 1e-3),
- trained from random init for the original's epochs E (**Scratch-E**; the zoo's recipes: E = 40
  for the MobileNet-style net, 30 for ResNet-20), and
- from random init for the original's compute (**Scratch-B**: ``ceil(E * F_full / F_pruned)`` epochs),

with the product's retraining code (``bocompress.worker.strategies.retrain``, the export option
``retrain``), on the 1347 training digits; accuracy on the 450 held-out digits.
"""

from __future__ import annotations

import time
from typing import Any

from bench.paper.common import log, search
from bench.quality_cells import Cell

#: model -> E, the epochs of its zoo recipe (bocompress/worker/zoo/train.py)
MODELS = {"mobilenet": 40, "resnet20": 30}


def run(budget: float = 0.25, trials: int = 24, finetune_epochs: int = 10, seed: int = 0,
        models: tuple[str, ...] = tuple(MODELS), original_epochs: int | None = None) -> dict[str, Any]:
    """``original_epochs`` overrides every model's E (a quick check; the page then says so)."""
    from bocompress.worker.strategies.retrain import RetrainConfig, retrain
    from bocompress.worker.strategies.training import accuracy
    from bocompress.worker.zoo import load_data

    x_tr, y_tr = load_data("digits32-train", 1347)
    rows: list[dict[str, Any]] = []
    originals: dict[str, float] = {}
    for model in models:
        E = original_epochs or MODELS[model]
        cell = Cell(model, "channel_l1", budget)
        originals[model] = cell.acc_original
        found = {opt: search(cell, opt, seed, trials) for opt in ("uniform", "bo")}
        same = cell.key(found["bo"]["theta"]) == cell.key(found["uniform"]["theta"])
        for opt in ("bo", "uniform") if not same else ("uniform",):
            pruned = cell._build(found[opt]["theta"], True)
            arch = ("BO = uniform" if same else "BO") if opt == "bo" or same else "uniform"
            base = {"model": model, "architecture": arch, "R": found[opt]["R"], "L": found[opt]["L"],
                    "acc_pruned": found[opt]["acc_before"], "original_epochs": E}
            for mode, epochs in (("finetune-labels", finetune_epochs), ("scratch-e", E), ("scratch-b", E)):
                t0 = time.perf_counter()
                res = retrain(pruned, cell.model, mode, (x_tr, y_tr), RetrainConfig(epochs=epochs, original_epochs=E,
                                                                                     seed=seed))
                row = {**base, "mode": mode, "epochs": res.epochs, "flops_ratio": res.flops_ratio,
                       "acc": accuracy(res.model, cell.x_test, cell.y_test), "seconds": time.perf_counter() - t0}
                rows.append(row)
                log(f"  retraining {model} {arch} R={row['R']:.3f} {mode} ({res.epochs} epochs): "
                    f"held-out {row['acc']:.4f} ({row['seconds']:.0f} s)")
    return {"models": list(models), "budget": budget, "rows": rows, "acc_original": originals,
            "finetune_epochs": finetune_epochs, "trials": trials}

"""ChipNet at each of the four budgets on the trained zoo models: achieved ratio, accuracy, wall time.

For ``resnet20`` and ``mobilenet`` (digits32) and each budget type (``channels``, ``activation``,
``params``, ``flops``) at one target ratio, run :func:`bocompress.worker.strategies.chipnet.chipnet` with the
paper's schedules and losses but a few epochs (a CPU run; the paper uses 20), selecting on 200
samples of the training split and training on the other 1147; then measure the 450 held-out
digits: the dense model's accuracy, the hard-pruned model's, and after the optional fine-tune.

Usage::

    python -m bench.chipnet_budgets [--epochs 3] [--finetune-epochs 1] [--budget 0.5] [--models resnet20 mobilenet]
        [--budgets params flops] [--gate-lr 0.05]

Prints a markdown table (not a test; writes nothing).
"""

from __future__ import annotations

import argparse
import time

import torch

from bocompress.worker.strategies.chipnet import BUDGET_TYPES, ChipNetConfig, chipnet
from bocompress.worker.strategies.training import accuracy
from bocompress.worker.zoo import load_data, load_model

#: Training-split samples held back for ChipNet's per-epoch model selection.
N_VAL = 200


def main(argv: list[str] | None = None) -> None:
    """Run the grid and print the table."""
    ap = argparse.ArgumentParser(prog="python -m bench.chipnet_budgets", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenet"])
    ap.add_argument("--budgets", nargs="+", default=list(BUDGET_TYPES), choices=BUDGET_TYPES)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--gate-lr", type=float, default=None, help="the gates' learning rate (default: lr, the paper's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, y = load_data("digits32-train", 1347)
    xt, yt = load_data("digits32", 450)
    train, val = (x[:-N_VAL], y[:-N_VAL]), (x[-N_VAL:], y[-N_VAL:])
    cfg = ChipNetConfig(epochs=args.epochs, finetune_epochs=args.finetune_epochs, gate_lr=args.gate_lr)
    print(f"ChipNet, budget {args.budget}, {args.epochs} soft-pruning epochs (paper: 20), "
          f"{args.finetune_epochs} fine-tune epoch(s), gate lr {cfg.gate_lr or cfg.lr}, {len(train[0])} training samples, "
          f"torch threads {args.threads}\n")
    print("| model | budget | achieved | rule (kept epoch) | params kept | held-out acc dense | pruned | fine-tuned | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = load_model(name)
        dense = accuracy(model, xt, yt)
        for kind in args.budgets:
            t0 = time.perf_counter()
            res = chipnet(model, train, val, kind, args.budget, cfg)
            wall = time.perf_counter() - t0
            rule = res.history[res.best_epoch]["rule"]
            pruned_acc = accuracy(res.hard_model, xt, yt)
            tuned = accuracy(res.model, xt, yt) if cfg.finetune_epochs else float("nan")
            print(f"| {name} | {kind} | {res.achieved:.4f} | {rule} ({res.best_epoch + 1}) | "
                  f"{res.params / res.params_dense:.3f} | {dense:.4f} | {pruned_acc:.4f} | {tuned:.4f} | {wall:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""Train the digits models of the zoo and write their weights: ``python -m worker.zoo.train``.

Regenerates ``worker/zoo/weights/digits-mlp.safetensors`` and ``digits-cnn.safetensors`` from
scikit-learn's bundled digits (the fixed 75/25 split of :func:`worker.zoo.data.digits_split`):
seed 0, one CPU thread and deterministic algorithms, so a rerun on the same torch/CPU gives the
same bits (other BLAS builds may differ in the last bits). Takes about half a minute on one core.

Options: ``--out DIR`` (default: the shipped weights folder), ``--only NAME`` (one model),
``--epochs N``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from worker.zoo import ARCHS, WEIGHTS_DIR
from worker.zoo.data import digits_split

__all__ = ["TRAIN_CONFIG", "accuracy", "train", "main"]

#: Recipe per model: Adam, minibatches, fixed epochs (no early stopping on the test split).
TRAIN_CONFIG: dict[str, dict[str, float]] = {
    "digits-mlp": {"epochs": 60, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64},
    "digits-cnn": {"epochs": 40, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64},
}
SEED = 0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on inputs ``N x 1 x 8 x 8`` and labels ``N``."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train(name: str, epochs: int | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Train one digits model deterministically; returns it (eval mode) and its metrics."""
    cfg = dict(TRAIN_CONFIG[name])
    if epochs is not None:
        cfg["epochs"] = epochs
    x_tr, y_tr, x_te, y_te = digits_split()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(SEED)
        model = ARCHS[name]()
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(cfg["epochs"]))
        gen = torch.Generator().manual_seed(SEED)
        loss_fn = nn.CrossEntropyLoss()
        bs = int(cfg["batch_size"])
        for _ in range(int(cfg["epochs"])):
            model.train()
            perm = torch.randperm(len(x_tr), generator=gen)
            for i in range(0, len(perm), bs):
                idx = perm[i : i + bs]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
                opt.step()
            sched.step()
        model.eval()
        metrics = {"train_accuracy": accuracy(model, x_tr, y_tr), "test_accuracy": accuracy(model, x_te, y_te)}
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    """Command line: train the digits models and write their safetensors."""
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(prog="python -m worker.zoo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--only", choices=sorted(TRAIN_CONFIG))
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [args.only] if args.only else list(TRAIN_CONFIG):
        t0 = time.perf_counter()
        model, metrics = train(name, args.epochs)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        meta = {"arch": name, "seed": str(SEED), "torch": torch.__version__,
                "config": json.dumps(TRAIN_CONFIG[name]), **{k: f"{v:.4f}" for k, v in metrics.items()}}
        path = args.out / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        print(f"{name}: test accuracy {metrics['test_accuracy']:.4f}, train {metrics['train_accuracy']:.4f}, "
              f"{sum(v.numel() for v in tensors.values())} params, {path.stat().st_size} bytes, "
              f"{time.perf_counter() - t0:.1f} s -> {path}")


if __name__ == "__main__":
    main()

"""Train the zoo models and write their weights: ``python -m bocompress.worker.zoo.train [--deep | --only NAME]``.

* ``python -m bocompress.worker.zoo.train``: the digits models (``digits-mlp``, ``digits-cnn``) on the 8x8
  ``digits`` (about half a minute on one core).
* ``python -m bocompress.worker.zoo.train --deep``: ``resnet20``, ``resnet56``, ``mobilenet`` on ``digits32``
  and ``transformer`` on ``digits-tokens`` (minutes each; see ``worker/zoo/weights/README.md``).
* ``--all``: both groups; ``--only NAME``: one model; ``--out DIR`` (default: the shipped weights
  folder); ``--epochs N`` (overrides the recipe, for quick checks).

Every model is trained on the 75% training split of :func:`bocompress.worker.zoo.data.digits_split` only
(the 25% held-out split is measured once, after training; no early stopping on it). Training is
seeded (:data:`SEED`), single-threaded and uses deterministic algorithms, so a rerun on the same
torch/CPU gives the same bits (other BLAS builds may differ in the last bits). The deep models see
random shifts of their training images (:func:`bocompress.worker.zoo.data.shift32`,
:func:`~bocompress.worker.zoo.data.shift_tokens`); the built-in datasets themselves are never augmented.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from bocompress.worker.zoo import ARCHS, WEIGHTS_DIR
from bocompress.worker.zoo.data import digits32_split, digits_split, digits_tokens_split, shift32, shift_tokens

__all__ = ["TRAIN_CONFIG", "DIGITS_MODELS", "DEEP_MODELS", "accuracy", "train", "main"]

#: Recipe per model. The digits models: Adam, minibatches, cosine per epoch, fixed epochs. The deep
#: models: ``optimizer`` (``sgd``: Nesterov momentum 0.9; ``adamw``), a per-step schedule of a linear
#: warm-up over ``warmup`` epochs then cosine to zero, ``augment`` random shifts of at most that
#: many pixels (of a fraction ``augment_p`` of the samples, default all), ``label_smoothing``; ``data`` names the view of the digits split.
TRAIN_CONFIG: dict[str, dict[str, float | str]] = {
    "digits-mlp": {"data": "digits", "epochs": 60, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64},
    "digits-cnn": {"data": "digits", "epochs": 40, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64},
    "resnet20": {"data": "digits32", "optimizer": "sgd", "epochs": 30, "lr": 0.1, "weight_decay": 5e-4,
                 "batch_size": 64, "warmup": 1, "augment": 3, "label_smoothing": 0.0},
    "resnet56": {"data": "digits32", "optimizer": "sgd", "epochs": 20, "lr": 0.1, "weight_decay": 5e-4,
                 "batch_size": 64, "warmup": 2, "augment": 3, "label_smoothing": 0.0},
    "mobilenet": {"data": "digits32", "optimizer": "sgd", "epochs": 40, "lr": 0.05, "weight_decay": 4e-5,
                  "batch_size": 64, "warmup": 1, "augment": 3, "label_smoothing": 0.0},
    "transformer": {"data": "digits-tokens", "optimizer": "adamw", "epochs": 80, "lr": 3e-3, "weight_decay": 0.05,
                    "batch_size": 32, "warmup": 2, "augment": 1, "augment_p": 0.5, "label_smoothing": 0.0},
}
DIGITS_MODELS = ("digits-mlp", "digits-cnn")
DEEP_MODELS = ("resnet20", "resnet56", "mobilenet", "transformer")
SEED = 0

_SPLITS = {"digits": digits_split, "digits32": digits32_split, "digits-tokens": digits_tokens_split}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on inputs ``N x ...`` and labels ``N``."""
    model.eval()
    hits = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def _train_digits(model: nn.Module, cfg: dict, x_tr: torch.Tensor, y_tr: torch.Tensor) -> None:
    """The digits models' recipe (unchanged, so their shipped weights stay bit-identical)."""
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


def _train_deep(model: nn.Module, cfg: dict, x_tr: torch.Tensor, y_tr: torch.Tensor, log: bool) -> None:
    """The deep models' recipe: SGD/AdamW, warm-up + cosine per step, random shifts (see TRAIN_CONFIG)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith("pos")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith("pos"))]
    groups = [{"params": decay, "weight_decay": float(cfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg["optimizer"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=float(cfg["lr"]))
    bs = int(cfg["batch_size"])
    per_epoch = math.ceil(len(x_tr) / bs)
    total, warm = int(cfg["epochs"]) * per_epoch, max(1, int(float(cfg["warmup"]) * per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg["label_smoothing"]))
    shift = int(cfg["augment"])
    augment = shift_tokens if cfg["data"] == "digits-tokens" else shift32
    t0 = time.perf_counter()
    for epoch in range(int(cfg["epochs"])):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        running = 0.0
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            xb = x_tr[idx]
            if shift > 0:
                xb = augment(xb, gen, shift, float(cfg["augment_p"])) if "augment_p" in cfg else augment(xb, gen, shift)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), y_tr[idx])
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
        if log:
            print(f"  epoch {epoch + 1}/{int(cfg['epochs'])}: train loss {running / len(x_tr):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


def train(name: str, epochs: int | None = None, log: bool = False) -> tuple[nn.Module, dict[str, float]]:
    """Train one zoo model deterministically; returns it (eval mode) and its metrics.

    Args:
        name: a key of :data:`TRAIN_CONFIG`.
        epochs: overrides the recipe's epochs (quick checks; the shipped weights use the recipe).
        log: print the training loss after each epoch (deep models).

    Returns:
        ``(model, {"train_accuracy", "test_accuracy"})``; test is the 450 held-out samples.
    """
    cfg = dict(TRAIN_CONFIG[name])
    if epochs is not None:
        cfg["epochs"] = epochs
    x_tr, y_tr, x_te, y_te = _SPLITS[str(cfg["data"])]()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(SEED)
        model = ARCHS[name]()
        if name in DIGITS_MODELS:
            _train_digits(model, cfg, x_tr, y_tr)
        else:
            _train_deep(model, cfg, x_tr, y_tr, log)
        model.eval()
        metrics = {"train_accuracy": accuracy(model, x_tr, y_tr), "test_accuracy": accuracy(model, x_te, y_te)}
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    """Command line: train zoo models and write their safetensors (see the module docstring)."""
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(prog="python -m bocompress.worker.zoo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--only", choices=sorted(TRAIN_CONFIG))
    group.add_argument("--deep", action="store_true", help="the deep models: " + ", ".join(DEEP_MODELS))
    group.add_argument("--all", action="store_true", help="the digits and the deep models")
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [args.only] if args.only else list(DEEP_MODELS) if args.deep else list(TRAIN_CONFIG) if args.all else list(DIGITS_MODELS)
    for name in names:
        t0 = time.perf_counter()
        model, metrics = train(name, args.epochs, log=True)
        seconds = time.perf_counter() - t0
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        config = dict(TRAIN_CONFIG[name], **({"epochs": args.epochs} if args.epochs else {}))
        meta = {"arch": name, "seed": str(SEED), "torch": torch.__version__, "data": str(config["data"]),
                "config": json.dumps(config), "train_seconds": f"{seconds:.0f}",
                **{k: f"{v:.4f}" for k, v in metrics.items()}}
        path = args.out / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        print(f"{name}: test accuracy {metrics['test_accuracy']:.4f}, train {metrics['train_accuracy']:.4f}, "
              f"{sum(v.numel() for v in tensors.values())} params, {path.stat().st_size} bytes, "
              f"{seconds:.1f} s -> {path}", flush=True)


if __name__ == "__main__":
    main()

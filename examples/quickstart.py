"""Quickstart: upload a trained model, search its per-layer compression, export the result.

Needs a running service and at least one worker, e.g. (two terminals):

    bocompress serve --no-auth
    bocompress worker --url http://127.0.0.1:8000

then ``python examples/quickstart.py [--url URL] [--token TOKEN] [--trials 16] [--out DIR]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bocompress
from bocompress.worker.zoo import load_data, load_model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="bocompress quickstart")
    ap.add_argument("--url", default=None, help="service URL (default: $BOCOMPRESS_URL or http://127.0.0.1:8000)")
    ap.add_argument("--token", default=None, help="client token (default: $BOCOMPRESS_TOKEN)")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--out", default="quickstart-out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    client = bocompress.Client(args.url, token=args.token)
    # 1. upload: your trained weights (here the zoo's trained digits CNN) as safetensors
    model = load_model("digits-cnn")
    uploaded = client.upload_model(model, arch="digits-cnn")
    print(f"uploaded {uploaded['id']} ({uploaded['size']} bytes)")

    # 2. a job: Tucker-2 for convolutions, SVD for linear layers (the paper's recipe), J = κ·L + R
    job = client.create_job({
        "name": "quickstart",
        "compression": {"model": uploaded["id"], "data": "digits",
                        "method": {"Conv2d": "tucker2", "Linear": "svd"}, "theta_min": 0.05},
        "objective": {"kind": "scalarized", "kappa": 1.0, "cost": "params"},
        "budget": {"max_trials": args.trials, "max_parallel": 2},
        "optimizer": {"n_initial": min(8, args.trials), "seed": 0},
    })
    print(f"job {job.id} created")

    # 3. wait with a progress bar, then look at the results
    job.wait(progress=not args.no_progress)
    df = job.trials()
    print(df[["number", "state", "distill_l2", "ratio", "objective"]].sort_values("objective").head())
    best = job.best()
    assert best is not None, f"job ended {job.state} without a completed trial"
    print(f"best trial {best['id']}: R={best['values']['ratio']:.3f} L={best['values']['distill_l2']:.4f}")
    fig = job.plot()
    fig.savefig(out / "quickstart.png")

    # 4. export the best trial (fine-tuned by distillation) and load it back
    job.export(best["id"], finetune_steps=args.finetune_steps, lr=1e-3)
    path = job.download(best["id"], out / "compressed.safetensors", progress=not args.no_progress)
    small = bocompress.load_compressed(path)
    x, y = load_data("digits", 450)
    with torch.no_grad():
        acc = (small(x).argmax(1) == y).float().mean().item()
        acc0 = (model(x).argmax(1) == y).float().mean().item()
    n_small = sum(p.numel() for p in small.parameters())
    n_big = sum(p.numel() for p in model.parameters())
    print(f"compressed model: {n_small} parameters ({n_small / n_big:.2f} of {n_big}); "
          f"accuracy {acc:.3f} (original {acc0:.3f}); saved to {path}")
    return {"job": job.id, "best": best, "path": str(path), "accuracy": acc, "accuracy_original": acc0,
            "params": n_small}


if __name__ == "__main__":
    main()

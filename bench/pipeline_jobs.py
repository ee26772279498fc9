"""The two-pass recipe as a product feature: one pipeline job through the service and a worker.

A ``recipe: {"kind": "two-pass"}`` job on the zoo's ``digits-cnn`` (tucker2 on the convolutions,
then svd on the linear layers of the fine-tuned first pass), ``constrained`` at ``--budget`` (the
final model's R), on a real service (SQLite) and a real worker subprocess. Prints each stage as the
API shows it (each pass's budget and R, the fine-tune export's L, the total R), then downloads the
final model, loads it with ``bocompress.load_compressed`` and measures its held-out accuracy on the 450
digits no pass saw, beside the original's and the wall time.

Usage::

    python -m bench.pipeline_jobs [--budget 0.3] [--trials 12] [--finetune-epochs 2]

Prints a markdown table (not a test; writes nothing).
"""

from __future__ import annotations

import argparse
import time

import torch

import bocompress
from bench._local import local_service


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline_jobs", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    args = ap.parse_args(argv)
    with local_service("bocompress-pipeline-") as (client, work):
        t0 = time.perf_counter()
        job = client.create_job({
            "name": "digits-cnn-two-pass",
            "compression": {"model": "digits-cnn", "data": "digits-train",
                            "method": {"Conv2d": "tucker2", "Linear": "svd"}},
            "objective": {"kind": "constrained", "budget": args.budget},
            "budget": {"max_trials": args.trials, "max_parallel": 1},
            "recipe": {"kind": "two-pass", "finetune": {"epochs": args.finetune_epochs}}})
        final = job.wait_pipeline(progress=False, poll=0.5, timeout=3600)
        pipe = job.refresh().pipeline
        wall = time.perf_counter() - t0
        if pipe["stage"] != "done":
            print(f"pipeline {pipe['stage']}: {pipe.get('reason')}")
            return
        best = final.best()
        final.export(best["id"])
        path = final.download(best["id"], work / "final.safetensors", progress=False, poll=0.5, timeout=600)
        from bocompress.worker.zoo import load_data, load_model

        small = bocompress.load_compressed(path)
        x, y = load_data("digits", 450)
        with torch.no_grad():
            acc = float((small(x).argmax(1) == y).float().mean())
            acc0 = float((load_model("digits-cnn")(x).argmax(1) == y).float().mean())
        ex = pipe["export"]["values"]
        first = job.best()
        print(f"Two-pass recipe on digits-cnn, total budget R <= {args.budget}, {args.trials} trials per pass, "
              f"{args.finetune_epochs} fine-tune epoch(s)\n")
        print("| stage | budget | R | L | held-out accuracy |")
        print("|---|---|---|---|---|")
        print(f"| first pass (convolutions), best trial | {pipe['budgets'][0]:.4f} | {pipe['ratios'][0]:.4f} | "
              f"{first['values']['distill_l2']:.3g} | {first['values'].get('accuracy', float('nan')):.4f} |")
        print(f"| fine-tune export (distillation) | | | {ex['distill_l2_before']:.3g} -> {ex['distill_l2']:.3g} | "
              f"{ex.get('accuracy_before', float('nan')):.4f} -> {ex.get('accuracy', float('nan')):.4f} |")
        print(f"| second pass (linear layers), best trial | {pipe['budgets'][1]:.4f} | {pipe['ratios'][1]:.4f} | "
              f"{best['values']['distill_l2']:.3g} (vs the fine-tuned first pass) | "
              f"{best['values'].get('accuracy', float('nan')):.4f} |")
        n = sum(p.numel() for p in small.parameters())
        print(f"| final model (one file, `load_compressed`) | {args.budget} | **{pipe['total_ratio']:.4f}** "
              f"({n:,} parameters) | | **{acc:.4f}** on the 450 held-out digits (original {acc0:.4f}) |")
        print(f"\nsubmit to done: {wall:.0f} s")


if __name__ == "__main__":
    main()

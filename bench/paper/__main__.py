"""``python -m bench.paper``: run the six studies and write ``docs/results.md``.

Usage::

    python -m bench.paper                       # every study, then the page (about 60 min on 2 cores)
    python -m bench.paper --studies 3 6         # some of them (the others' saved results stay on the page)
    python -m bench.paper --render              # the page from bench/results/paper/*.json only

Each study's raw results are written to ``bench/results/paper/<name>.json`` as soon as it ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "paper"
STUDIES = {
    "1": ("per_layer", "studies 1 and 2: per-layer BO vs uniform θ; the distillation proxy vs top-1 error"),
    "3": ("channel_selection", "study 3: LASSO + least squares vs max response vs first k"),
    "4": ("retraining", "study 4: fine-tune vs Scratch-E vs Scratch-B"),
    "5": ("chipnet_vs_bo", "study 5: BO vs ChipNet per budget type"),
    "6": ("two_pass", "study 6: the two-pass recipe vs one pass"),
}


def _run(key: str, args: argparse.Namespace) -> dict:
    import importlib

    mod = importlib.import_module(f"bench.paper.{STUDIES[key][0]}")
    if key == "1":
        return mod.run(seeds=args.seeds, trials=args.trials)
    if key == "4":
        return mod.run(trials=args.trials, original_epochs=args.original_epochs, finetune_epochs=args.finetune_epochs,
                       models=tuple(args.retrain_models))
    if key == "5":
        return mod.run(trials=args.trials, chipnet_epochs=args.chipnet_epochs)
    if key == "6":
        return mod.run(seeds=args.seeds, trials=args.trials)
    return mod.run()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.paper", description=__doc__.splitlines()[0])
    ap.add_argument("--studies", nargs="*", default=list(STUDIES), choices=list(STUDIES) + ["2"],
                    help="which studies to run (2 runs with 1)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of each BO search (studies 1, 2, 6)")
    ap.add_argument("--trials", type=int, default=24, help="trials of each BO search")
    ap.add_argument("--original-epochs", type=int, default=None,
                    help="study 4: E for every model (default: each zoo model's recipe, 40 and 30)")
    ap.add_argument("--retrain-models", nargs="*", default=["mobilenet", "resnet20"], help="study 4's models")
    ap.add_argument("--finetune-epochs", type=int, default=10, help="study 4: label fine-tuning epochs")
    ap.add_argument("--chipnet-epochs", type=int, default=10, help="study 5: ChipNet's soft-pruning epochs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--render", action="store_true", help="only rebuild docs/results.md from the saved results")
    args = ap.parse_args(argv)
    from bench.compression_quality import _quiet

    _quiet()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render:
        for key in dict.fromkeys("1" if k == "2" else k for k in args.studies):
            name, what = STUDIES[key]
            print(f"{what} ...", flush=True)
            t0 = time.perf_counter()
            res = _run(key, args)
            res["seconds"] = time.perf_counter() - t0
            res["argv"] = sys.argv[1:]
            res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
            print(f"  ... {res['seconds'] / 60:.1f} min", flush=True)
    from bench.paper.report import write

    path = write({name: json.loads((RESULTS / f"{name}.json").read_text())
                  for name, _ in STUDIES.values() if (RESULTS / f"{name}.json").exists()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

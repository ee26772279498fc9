"""The seed papers' claims, reproduced on the zoo's trained deep models: ``python -m bench.paper``.

One entry point (:mod:`bench.paper.__main__`) runs six studies and writes ``docs/results.md``:

1. per-layer BO vs one θ for every layer at equal R (Ma et al.) — :mod:`bench.paper.per_layer`;
2. the distillation proxy: θ minimizing L vs θ minimizing top-1 error (Ma et al.) — :mod:`bench.paper.per_layer`;
3. LASSO + least squares vs "max response" vs "first k" channel selection (He et al.) —
   :mod:`bench.paper.channel_selection`;
4. fine-tune vs Scratch-E vs Scratch-B (Liu et al.) — :mod:`bench.paper.retraining`;
5. BO vs ChipNet at equal budget, per budget type (Tiwari et al.) — :mod:`bench.paper.chipnet_vs_bo`;
6. the two-pass recipe (conv layers, fine-tune, then linear layers) vs one pass — :mod:`bench.paper.two_pass`.

Every study uses the same evaluation code (:class:`bench.quality_cells.Cell`: the worker's
compressors, BatchNorm re-estimation, L on 128 calibration images of the training split, a fixed
distillation fine-tune, accuracy on the 450 held-out digits no zoo model was trained on) and the
product's engine (``bocompress.service.optimizer.propose``) for BO. Each study's raw results go to
``bench/results/paper/<study>.json``; ``--render`` rebuilds the page from them.
"""

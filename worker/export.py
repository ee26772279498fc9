"""Export: build a trial's compressed model, optionally fine-tune it by distillation, serialize it."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.compressed import to_bytes
from bocompress.worker import batch as B


def _relative_l2(student: nn.Module, inputs: B.Batch, teacher_out: Tensor, batch_size: int = 512,
                 output: str | int | None = None) -> float:
    with torch.no_grad():
        outs = torch.cat([B.forward(student, xb, output).float() for _, xb in B.iter_batches(inputs, batch_size)])
    num = (outs - teacher_out).pow(2).flatten(1).sum(1).mean()
    den = teacher_out.pow(2).flatten(1).sum(1).mean()
    return float(num / den)


def finetune(student: nn.Module, inputs: B.Batch, teacher_out: Tensor, steps: int, lr: float,
             batch_size: int = 64, seed: int = 0, output: str | int | None = None) -> None:
    """Distillation fine-tuning: minimize ||student(x) - f*(x)||² on the calibration inputs (Adam).

    Args:
        student: The compressed model (trained in place).
        inputs: Calibration inputs, N x ... (a tensor or a dict of named tensors).
        teacher_out: The original model's outputs on ``inputs``, N x k.
        steps: Optimizer steps.
        lr: Adam learning rate.
        output: the part of the model's output distilled (:func:`bocompress.worker.batch.select_output`).
    """
    if steps <= 0:
        return
    n = B.n_samples(inputs)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    masks = {n: (p != 0).to(p.dtype) for n, p in student.named_parameters() if p.dim() > 1 and (p == 0).any()}
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g).to(teacher_out.device)
        out = B.forward(student, B.take(inputs, idx), output)
        loss = (out - teacher_out[idx]).pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # pruned weights stay pruned
            for name, p in student.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
    student.eval()


def build_export(original: nn.Module, compressor: Any, arch: Any, theta: dict[str, float], inputs: B.Batch,
                 teacher_out: Tensor, steps: int = 0, lr: float = 1e-4, holdout: float = 0.25,
                 extra: dict[str, Any] | None = None, output: str | int | None = None,
                 linearized: list[str] | None = None) -> tuple[bytes, dict[str, float], dict[str, Any]]:
    """The safetensors bytes of the compressed model, its measured values, and its description.

    Fine-tuning uses the first ``1 - holdout`` of the calibration inputs; L before and after is
    measured on the held-out rest, so the reported gain is not a training-set number.

    Args:
        arch: the zoo name, import path or :class:`bocompress.modelspec.ModelSpec` of the model.
        output: the part of the model's output distilled.
        linearized: HF ``Conv1D`` layers the worker turned into ``nn.Linear`` (recorded, so that
            :func:`bocompress.load_compressed` does the same).
    """
    t0 = time.perf_counter()
    student = compressor.apply(theta)
    n = B.n_samples(inputs)
    n_fit = max(1, int(n * (1 - holdout))) if steps > 0 else n
    if steps > 0 and n_fit < n:
        held_x, held_y = B.take(inputs, slice(n_fit, n)), teacher_out[n_fit:]
    else:
        held_x, held_y = inputs, teacher_out
    before = _relative_l2(student, held_x, held_y, output=output)
    finetune(student, B.head(inputs, n_fit), teacher_out[:n_fit], steps, lr, output=output)
    after = _relative_l2(student, held_x, held_y, output=output)
    student = student.cpu()
    params = int(compressor.count_params(student))
    info: dict[str, Any] = {"theta": theta, "finetune_steps": steps, "lr": lr, "params": params, **(extra or {})}
    if output is not None:
        info["output"] = output
    if linearized:
        info["linearized"] = list(linearized)
    data, desc = to_bytes(original, student, arch, info)
    values = {"distill_l2_before": before, "distill_l2": after, "params": float(params),
              "finetune_steps": float(steps), "export_seconds": time.perf_counter() - t0}
    if "sparse" in desc:
        values["stored_nonzero"] = float(desc["sparse"]["stored_values"])
    return data, values, desc

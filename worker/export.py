"""Export: build a trial's compressed model, optionally fine-tune it by distillation, serialize it."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.compressed import to_bytes


def _relative_l2(student: nn.Module, inputs: Tensor, teacher_out: Tensor, batch_size: int = 512) -> float:
    with torch.no_grad():
        outs = torch.cat([student(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    num = (outs - teacher_out).pow(2).flatten(1).sum(1).mean()
    den = teacher_out.pow(2).flatten(1).sum(1).mean()
    return float(num / den)


def finetune(student: nn.Module, inputs: Tensor, teacher_out: Tensor, steps: int, lr: float,
             batch_size: int = 64, seed: int = 0) -> None:
    """Distillation fine-tuning: minimize ||student(x) - f*(x)||² on the calibration inputs (Adam).

    Args:
        student: The compressed model (trained in place).
        inputs: Calibration inputs, N x ... .
        teacher_out: The original model's outputs on ``inputs``, N x k.
        steps: Optimizer steps.
        lr: Adam learning rate.
    """
    if steps <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    masks = {n: (p != 0).to(p.dtype) for n, p in student.named_parameters() if p.dim() > 1 and (p == 0).any()}
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (min(batch_size, len(inputs)),), generator=g).to(inputs.device)
        loss = (student(inputs[idx]) - teacher_out[idx]).pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # pruned weights stay pruned
            for n, p in student.named_parameters():
                if n in masks:
                    p.mul_(masks[n])
    student.eval()


def build_export(original: nn.Module, compressor: Any, arch: str, theta: dict[str, float], inputs: Tensor,
                 teacher_out: Tensor, steps: int = 0, lr: float = 1e-4, holdout: float = 0.25,
                 extra: dict[str, Any] | None = None) -> tuple[bytes, dict[str, float], dict[str, Any]]:
    """The safetensors bytes of the compressed model, its measured values, and its description.

    Fine-tuning uses the first ``1 - holdout`` of the calibration inputs; L before and after is
    measured on the held-out rest, so the reported gain is not a training-set number.
    """
    t0 = time.perf_counter()
    student = compressor.apply(theta)
    n_fit = max(1, int(len(inputs) * (1 - holdout))) if steps > 0 else len(inputs)
    held_x, held_y = (inputs[n_fit:], teacher_out[n_fit:]) if steps > 0 and n_fit < len(inputs) else (inputs, teacher_out)
    before = _relative_l2(student, held_x, held_y)
    finetune(student, inputs[:n_fit], teacher_out[:n_fit], steps, lr)
    after = _relative_l2(student, held_x, held_y)
    student = student.cpu()
    params = int(compressor.count_params(student))
    data, desc = to_bytes(original, student, arch, {"theta": theta, "finetune_steps": steps, "lr": lr,
                                                    "params": params, **(extra or {})})
    values = {"distill_l2_before": before, "distill_l2": after, "params": float(params),
              "finetune_steps": float(steps), "export_seconds": time.perf_counter() - t0}
    return data, values, desc

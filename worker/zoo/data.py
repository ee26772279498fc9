"""Calibration data: scikit-learn's bundled digits (a fixed held-out split) and seeded synthetic inputs."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "digits_split"]

#: The digits split is fixed: ``train_test_split(test_size=0.25, random_state=0, stratify=labels)``.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits, split 75/25 (seed 0, stratified), pixels scaled to [0, 1].

    Returns:
        ``(x_train, y_train, x_test, y_test)``: inputs ``N x 1 x 8 x 8`` float32 (pixel / 16) and
        labels ``N`` int64 (1347 training and 450 held-out samples).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        ds.data, ds.target, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=ds.target
    )

    def to_x(a) -> Tensor:  # noqa: ANN001 - numpy array
        return (torch.as_tensor(a, dtype=torch.float32) / 16.0).reshape(-1, 1, 8, 8).contiguous()

    def to_y(a) -> Tensor:  # noqa: ANN001 - numpy array
        return torch.as_tensor(a, dtype=torch.int64).contiguous()

    return to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te)

"""Calibration and training data built from scikit-learn's bundled digits (a fixed held-out split).

Three views of the same fixed 75/25 split (:func:`digits_split`, seed 0, stratified):

* ``digits``: the 8x8 images, ``N x 1 x 8 x 8`` float32, pixel / 16 in ``[0, 1]``;
* ``digits32``: the same images bilinearly upsampled to 32x32, replicated over 3 channels and
  standardized with :data:`DIGITS32_MEAN` / :data:`DIGITS32_STD`: ``N x 3 x 32 x 32`` float32
  (the CIFAR-style zoo models: ResNet-20/56, the MobileNet-style net);
* ``digits-tokens``: each image as 64 integer token ids, its 17 grey levels ``0..16`` in raster order
  (the transformer): ``N x 64`` int64.

Augmentation (random shifts) lives only in training (:func:`shift32`, :func:`shift_tokens`), never
in these sets.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "DIGITS32_MEAN",
    "DIGITS32_STD",
    "TOKEN_LEVELS",
    "digits_split",
    "digits32_split",
    "digits_tokens_split",
    "to_digits32",
    "to_tokens",
    "shift32",
    "shift_tokens",
]

#: The digits split is fixed: ``train_test_split(test_size=0.25, random_state=0, stratify=labels)``.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25

#: Mean and standard deviation of the upsampled training pixels (in ``[0, 1]``), rounded; every
#: ``digits32`` tensor is ``(pixel - mean) / std``, so the background (pixel 0) is about -0.94.
DIGITS32_MEAN = 0.305
DIGITS32_STD = 0.324

#: The 8x8 digits have 17 grey levels (0..16): token ids 0..16.
TOKEN_LEVELS = 17


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


def to_digits32(x: Tensor) -> Tensor:
    """8x8 digits ``N x 1 x 8 x 8`` in ``[0, 1]`` -> ``N x 3 x 32 x 32`` (bilinear, 3 equal channels, standardized)."""
    up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return ((up - DIGITS32_MEAN) / DIGITS32_STD).expand(-1, 3, -1, -1).contiguous()


def to_tokens(x: Tensor) -> Tensor:
    """8x8 digits ``N x 1 x 8 x 8`` in ``[0, 1]`` -> ``N x 64`` int64 grey levels ``0..16`` (raster order)."""
    return torch.round(x.reshape(len(x), 64) * 16.0).to(torch.int64).clamp_(0, TOKEN_LEVELS - 1)


@functools.lru_cache(maxsize=1)
def digits32_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`digits_split` as ``digits32``: inputs ``N x 3 x 32 x 32`` float32, labels ``N`` int64."""
    x_tr, y_tr, x_te, y_te = digits_split()
    return to_digits32(x_tr), y_tr, to_digits32(x_te), y_te


@functools.lru_cache(maxsize=1)
def digits_tokens_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`digits_split` as ``digits-tokens``: inputs ``N x 64`` int64 (0..16), labels ``N`` int64."""
    x_tr, y_tr, x_te, y_te = digits_split()
    return to_tokens(x_tr), y_tr, to_tokens(x_te), y_te


def _shift(x: Tensor, max_shift: int, fill: float, gen: torch.Generator) -> Tensor:
    """Shift each image of ``N x C x H x W`` by its own random integer offset in ``[-max_shift, max_shift]``."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)
    off = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(off.tolist())])


def shift32(x: Tensor, gen: torch.Generator, max_shift: int = 3) -> Tensor:
    """Training augmentation for ``digits32`` batches: a random shift of up to ``max_shift`` pixels, background fill."""
    return _shift(x, max_shift, -DIGITS32_MEAN / DIGITS32_STD, gen)


def shift_tokens(tokens: Tensor, gen: torch.Generator, max_shift: int = 1, p: float = 1.0) -> Tensor:
    """Training augmentation for ``digits-tokens`` batches ``N x 64``: shift 8x8 images by up to one pixel.

    A pixel is an eighth of the image, so only a fraction ``p`` of the samples (drawn from ``gen``)
    is shifted; the others are returned as they are.
    """
    img = tokens.reshape(-1, 1, 8, 8).float()
    out = _shift(img, max_shift, 0.0, gen).reshape(-1, 64).to(torch.int64)
    if p < 1.0:
        keep = torch.rand(len(tokens), generator=gen) >= p
        out[keep] = tokens[keep]
    return out

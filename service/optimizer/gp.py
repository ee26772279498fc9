"""Gaussian-process surrogate: construction, warm-started capped fitting, kernels.

Two kernels:

- ``rbf``: BoTorch's default (an ARD RBF kernel with the dimension-scaled lengthscale prior of
  Hvarfner et al. 2024), the off-the-shelf baseline.
- ``additive``: a first-order additive kernel ``sum_i w_i k_i(x_i, x'_i)`` (one 1-d RBF per
  dimension with its own weight) plus a scaled full ARD RBF for the interactions. Compression
  error is close to additive over layers (each layer's error adds), which this prior encodes
  while the full term keeps the interactions learnable.

Fitting is warm-started from hyperparameters saved in the job's ``state`` (plain JSON lists)
and the L-BFGS iterations are capped, so a refit after one more observation costs a few
iterations rather than a cold fit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from botorch.exceptions.warnings import OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from gpytorch.constraints import GreaterThan, Positive
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.means import LinearMean, Mean
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import GammaPrior, LogNormalPrior
from torch import Tensor

KERNELS = ("rbf", "additive")

# Floor on the observed noise variance of a standardized-scale-free target: a reported standard
# error of 0 would make the kernel matrix singular.
MIN_YVAR = 1e-6


class FirstOrderAdditiveKernel(Kernel):
    r"""``k(x, x') = sum_i w_i * exp(-(x_i - x'_i)^2 / (2 l_i^2))``.

    One RBF per input dimension with its own lengthscale ``l_i`` and positive weight ``w_i``.
    Memory is ``n x m x d`` for ``n x d`` and ``m x d`` inputs.

    Args:
        d: The input dimension.
        batch_shape: The kernel's batch shape.
    """

    has_lengthscale = True

    def __init__(self, d: int, batch_shape: torch.Size = torch.Size()) -> None:
        prior = LogNormalPrior(loc=math.sqrt(2.0), scale=math.sqrt(3.0))
        super().__init__(
            ard_num_dims=d,
            batch_shape=batch_shape,
            lengthscale_prior=prior,
            lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=prior.mode),
        )
        self.register_parameter("raw_weights", torch.nn.Parameter(torch.zeros(*batch_shape, 1, d)))
        self.register_constraint("raw_weights", Positive())
        self.initialize(weights=torch.full((*batch_shape, 1, d), 0.5 / d))

    @property
    def weights(self) -> Tensor:
        """The per-dimension weights, ``batch_shape x 1 x d``."""
        return self.raw_weights_constraint.transform(self.raw_weights)

    @weights.setter
    def weights(self, value: Tensor) -> None:
        self.initialize(raw_weights=self.raw_weights_constraint.inverse_transform(value))

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params: Any) -> Tensor:
        """Covariance of ``batch_shape x n x d`` and ``batch_shape x m x d`` inputs.

        Returns:
            ``batch_shape x n x m`` (or ``batch_shape x n`` when ``diag``).
        """
        w = self.weights  # batch_shape x 1 x d
        if diag:
            return (w.sum(dim=-1) * torch.ones_like(x1[..., 0])).to(x1)
        z1 = x1.div(self.lengthscale)
        z2 = x2.div(self.lengthscale)
        sq = (z1.unsqueeze(-2) - z2.unsqueeze(-3)).pow(2)  # batch x n x m x d
        return (torch.exp(-0.5 * sq) * w.unsqueeze(-2)).sum(dim=-1)


def make_covar(kernel: str, d: int) -> Kernel | None:
    """The covariance module for ``kernel`` (None: BoTorch's default)."""
    if kernel == "rbf":
        return None
    if kernel == "additive":
        full = ScaleKernel(
            get_covar_module_with_dim_scaled_prior(ard_num_dims=d),
            outputscale_prior=GammaPrior(2.0, 4.0),
        )
        full.outputscale = 0.5
        return FirstOrderAdditiveKernel(d) + full
    raise ValueError(f"unknown kernel {kernel!r}; use one of {KERNELS}")


MEANS = ("constant", "linear")


def make_mean(mean: str, d: int) -> Mean | None:
    """The prior mean module for ``mean`` (None: BoTorch's default constant mean).

    ``linear`` is ``b + w . x``, learned with the kernel. For compression jobs the GP models log L,
    which falls as every theta grows (each layer keeps more); a constant mean reverts to the
    average log L away from the data, so the heavily compressed corner, where R is smallest, looks
    as good as the average and the acquisition keeps proposing it. A linear trend extrapolates the
    error upward there instead.
    """
    if mean == "constant":
        return None
    if mean == "linear":
        return LinearMean(input_size=d)
    raise ValueError(f"unknown mean {mean!r}; use one of {MEANS}")


def _signature(kernel: str, d: int, fixed_noise: bool, mean: str = "constant") -> str:
    return f"{kernel}:{d}:{'fixed' if fixed_noise else 'inferred'}:{mean}"


def fit_gp(
    X: Tensor,
    Y: Tensor,
    Yvar: Tensor | None,
    kernel: str,
    state: dict[str, Any] | None,
    maxiter: int,
    mean: str = "constant",
) -> tuple[SingleTaskGP, dict[str, Any]]:
    """Fit a SingleTaskGP, warm-started from ``state``.

    Args:
        X: ``n x d`` training inputs in the unit cube.
        Y: ``n x 1`` targets (any scale: an outcome Standardize is applied).
        Yvar: ``n x 1`` observed noise variances, or None to infer a homoskedastic noise.
        kernel: ``rbf`` or ``additive``.
        state: The ``gp`` entry of the job's state from the last fit, or None.
        maxiter: The cap on L-BFGS iterations.
        mean: ``constant`` or ``linear`` (see :func:`make_mean`).

    Returns:
        The fitted model (in eval mode) and the new ``gp`` state (JSON-serializable).
    """
    d = X.shape[-1]
    model = SingleTaskGP(
        X, Y, train_Yvar=Yvar, covar_module=make_covar(kernel, d), mean_module=make_mean(mean, d),
        outcome_transform=Standardize(m=1),
    )
    sig = _signature(kernel, d, Yvar is not None, mean)
    warm = False
    if state and state.get("signature") == sig:
        saved = state.get("params", {})
        with torch.no_grad():
            for name, p in model.named_parameters():
                v = saved.get(name)
                if v is None:
                    continue
                t = torch.tensor(v, dtype=p.dtype)
                if t.shape == p.shape and bool(torch.isfinite(t).all()):
                    p.copy_(t)
                    warm = True
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        fit_gpytorch_mll(
            mll,
            optimizer_kwargs={"options": {"maxiter": int(maxiter if warm else 2 * maxiter)}},
            max_attempts=2,
        )
    model.eval()
    new_state = {
        "signature": sig,
        "params": {n: p.detach().tolist() for n, p in model.named_parameters()},
    }
    return model, new_state

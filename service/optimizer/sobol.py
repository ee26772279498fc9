"""The seeded scrambled-Sobol sequence that seeds every job.

Trial ``i`` of a job takes point ``i`` of one scrambled sequence (seeded with the job's seed), so
the initial design does not depend on how the service batches its calls to ``propose``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.quasirandom import SobolEngine

# SobolEngine's direction numbers cover this many dimensions.
MAX_SOBOL_DIM = SobolEngine.MAXDIM


def sobol_points(d: int, seed: int, start: int, n: int) -> Tensor:
    """Points ``start .. start + n - 1`` of the job's scrambled Sobol sequence.

    Args:
        d: The dimension.
        seed: The job's seed (scrambling).
        start: The index of the first point (how many points came before).
        n: How many points.

    Returns:
        An ``n x d`` float64 tensor in ``[0, 1)^d``.
    """
    if d > MAX_SOBOL_DIM:
        # Beyond the direction-number table: a seeded uniform design (still reproducible).
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(start))
        return torch.rand(n, d, generator=g, dtype=torch.float64)
    engine = SobolEngine(dimension=d, scramble=True, seed=int(seed))
    if start > 0:
        engine.fast_forward(int(start))
    return engine.draw(int(n), dtype=torch.float64)

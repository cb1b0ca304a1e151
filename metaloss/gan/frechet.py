"""The Fréchet distance between two samples (Heusel et al., "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017), on whatever features the data
set measures in: the points themselves (the ring), a classifier's features (MNIST-1D)."""

from __future__ import annotations

import numpy as np
from torch import Tensor


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """``||μ_a - μ_b||² + Tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` of two samples ``[n, d]``."""
    from scipy import linalg

    x, y = a.double().numpy(), b.double().numpy()
    mu, nu = x.mean(0), y.mean(0)
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu - nu) ** 2).sum() + np.trace(ca + cb - 2 * root))

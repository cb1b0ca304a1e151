"""Barron's general and adaptive robust loss with learned shape α and scale c.

Barron, "A General and Adaptive Robust Loss Function", CVPR 2019.
"""

from __future__ import annotations

import torch
from torch import nn

from metaloss.losses.base import ParametricLoss


class AdaptiveRobust(ParametricLoss):
    """c² ρ(r, α, c) with ρ = |α-2|/α · (((r/c)²/|α-2| + 1)^{α/2} - 1), per output mean.

    Multiplying by c² makes every member ≈ ½ r² near zero. α = 1 is the pseudo-Huber
    (Charbonnier) loss c²(√(1 + (r/c)²) - 1) — Huber-like, quadratic then linear with
    slope c — and α → 2 is ½ r². α is kept in (alpha_min, alpha_max) through a sigmoid,
    away from the removable singularities at 0 and 2; c = exp(log_scale).
    """

    kinds = ("regression",)

    def __init__(
        self,
        init_alpha: float = 1.0,
        init_scale: float = 1.0,
        alpha_min: float = 0.01,
        alpha_max: float = 1.99,
    ) -> None:
        if not alpha_min < init_alpha < alpha_max:
            raise ValueError(f"init_alpha must lie in ({alpha_min}, {alpha_max})")
        super().__init__(
            init_alpha=init_alpha, init_scale=init_scale, alpha_min=alpha_min, alpha_max=alpha_max
        )
        self.alpha_min, self.alpha_max = alpha_min, alpha_max
        u = (init_alpha - alpha_min) / (alpha_max - alpha_min)
        self.alpha_logit = nn.Parameter(torch.logit(torch.tensor(u)))
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())

    @property
    def alpha(self) -> torch.Tensor:
        return self.alpha_min + (self.alpha_max - self.alpha_min) * torch.sigmoid(self.alpha_logit)

    def forward(self, pred, target, **_):
        a, c = self.alpha, self.log_scale.exp()
        r2 = ((pred - target) / c) ** 2
        b = (a - 2).abs()
        rho = b / a * ((r2 / b + 1) ** (a / 2) - 1)
        return (c**2 * rho).reshape(rho.shape[0], -1).mean(-1)

"""Poly-N with learned coefficients.

Leng, Xu, Song, Zhang, Zhou, Zhu, Li, Schölkopf, Anguelov, "PolyLoss: A Polynomial
Expansion Perspective of Classification Loss Functions", ICLR 2022.
"""

from __future__ import annotations

import torch
from torch import nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot

MAX_DEGREE = 64


class PolyN(ParametricLoss):
    """CE + Σ_{j=1..N} ε_j (1 - p_t)^j with learned ε (``epsilon``, shape [N]).

    ``init_epsilon`` = 0 (the default) is exactly cross-entropy; [1] is Poly-1.
    """

    kinds = ("classification", "binary")
    powers: torch.Tensor  # a buffer: 1..degree

    def __init__(self, degree: int = 3, init_epsilon=None) -> None:
        if not isinstance(degree, int) or not 1 <= degree <= MAX_DEGREE:
            # (1 - p)^j vanishes for large j: higher degrees add nothing but memory
            raise ValueError(f"degree must be an integer in [1, {MAX_DEGREE}], got {degree!r}")
        eps = [0.0] * degree if init_epsilon is None else [float(e) for e in init_epsilon]
        if len(eps) != degree:
            raise ValueError(f"init_epsilon has {len(eps)} values for degree {degree}")
        super().__init__(degree=degree, init_epsilon=eps)
        self.epsilon = nn.Parameter(torch.tensor(eps))
        self.register_buffer(
            "powers", torch.arange(1, degree + 1, dtype=torch.float32), persistent=False
        )

    def forward(self, pred, target, **_):
        logp = torch.log_softmax(binary_as_two_class(pred), dim=-1)
        log_pt = (logp * one_hot(target, logp.shape[-1], logp.dtype)).sum(-1)
        one_minus = (1.0 - log_pt.exp())[:, None] ** self.powers.to(logp.dtype)
        return -log_pt + (one_minus * self.epsilon).sum(-1)

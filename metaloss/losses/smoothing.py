"""Label smoothing with a learned smoothing rate (global or per class).

Label smoothing: Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016; learning ε follows the meta-learned
soft-target line of work (e.g. Vyas, Saxena, Voice, "Learning Soft Labels via
Meta Learning", 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot


class LearnedSmoothing(ParametricLoss):
    """CE against q = (1 - ε_y) onehot(y) + ε_y / C, with ε = eps_max · sigmoid(logit).

    ``per_class``: one ε per target class (needs ``num_classes``), else one global ε.
    At ``init_epsilon`` it equals the fixed ``label_smoothing`` loss with that ε.
    """

    kinds = ("classification", "binary")

    def __init__(
        self,
        init_epsilon: float = 0.1,
        per_class: bool = False,
        num_classes: int = 2,
        eps_max: float = 0.5,
    ) -> None:
        if not 0.0 < init_epsilon < eps_max:
            raise ValueError(f"init_epsilon must lie in (0, {eps_max})")
        super().__init__(
            init_epsilon=init_epsilon, per_class=per_class, num_classes=num_classes, eps_max=eps_max
        )
        self.eps_max = eps_max
        shape = (num_classes,) if per_class else ()
        u = init_epsilon / eps_max
        # plain-float logit: no tensor op, so the loader can build this shape-only on `meta`
        self.epsilon_logit = nn.Parameter(torch.full(shape, math.log(u / (1 - u))))

    @property
    def epsilon(self) -> torch.Tensor:
        return self.eps_max * torch.sigmoid(self.epsilon_logit)

    def forward(self, pred, target, **_):
        logp = torch.log_softmax(binary_as_two_class(pred), dim=-1)
        c = logp.shape[-1]
        y = one_hot(target, c, logp.dtype)
        eps = self.epsilon
        eps = (y * eps).sum(-1, keepdim=True) if eps.ndim else eps
        q = (1 - eps) * y + eps / c
        return -(q * logp).sum(-1)

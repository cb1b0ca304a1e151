"""Per-class logit scale/shift and class weights for imbalanced classification.

Li, Lin, Li, Wang, Oymak, "AutoBalance: Optimized Loss Functions for Imbalanced Data",
NeurIPS 2021 (the parametric family; cf. logit adjustment, Menon et al. ICLR 2021).
"""

from __future__ import annotations

import torch
from torch import nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot
from metaloss.losses.fixed import log_prior
from metaloss.schema import LOSS_RULES


class LogitAdjusted(ParametricLoss):
    """w_y · CE(s ⊙ z + b + τ log π, y): per-class scales ``scale`` [C], shifts ``shift`` [C]
    and weights ``exp(log_weight)`` [C]; π the training split's class prior (``class_counts``
    in the loss context) and ``tau`` a fixed constant, 0 by default. At the initial φ (s = 1,
    b = 0, w = 1) it is exactly cross-entropy (``tau`` = 0) or exactly the logit-adjusted loss
    :func:`~metaloss.losses.fixed.logit_adjusted_ce` at that τ (Menon et al. 2021): a warm
    start *inside* the family (``loss=residual loss.base=logit_adjusted_ce
    loss.family=logit_adjusted loss.start_at_base=true``, docs/meta.md). ``num_classes`` is
    filled in from the task (2 for binary tasks)."""

    kinds = ("classification", "binary")

    def __init__(self, num_classes: int = 2, tau: float = 0.0) -> None:
        if problem := LOSS_RULES["LogitAdjusted"]["tau"](tau):  # the config's rule, one source
            raise ValueError(f"LogitAdjusted: tau = {tau!r}: must be {problem}")
        super().__init__(num_classes=num_classes, tau=float(tau))
        self.tau = float(tau)
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.shift = nn.Parameter(torch.zeros(num_classes))
        self.log_weight = nn.Parameter(torch.zeros(num_classes))

    def forward(self, pred, target, class_counts=None, **_):
        logits = binary_as_two_class(pred)
        if logits.shape[-1] != self.scale.shape[0]:
            raise ValueError(
                f"LogitAdjusted built for {self.scale.shape[0]} classes got "
                f"{logits.shape[-1]} logits"
            )
        y = one_hot(target, logits.shape[-1], logits.dtype)
        adjusted = logits * self.scale + self.shift
        if self.tau != 0.0:  # the prior, as logit_adjusted_ce adds it: exact at the start φ
            adjusted = adjusted + self.tau * log_prior("LogitAdjusted", pred, class_counts)
        logp = torch.log_softmax(adjusted, dim=-1)
        return -(y * logp).sum(-1) * (y * self.log_weight.exp()).sum(-1)

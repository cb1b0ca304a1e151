"""Per-class logit scale/shift and class weights for imbalanced classification.

Li, Lin, Li, Wang, Oymak, "AutoBalance: Optimized Loss Functions for Imbalanced Data",
NeurIPS 2021 (the parametric family; cf. logit adjustment, Menon et al. ICLR 2021).
"""

from __future__ import annotations

import torch
from torch import nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot


class LogitAdjusted(ParametricLoss):
    """w_y · CE(s ⊙ z + b, y): per-class scales ``scale`` [C], shifts ``shift`` [C] and
    weights ``exp(log_weight)`` [C]. At the initial φ (s = 1, b = 0, w = 1) it is exactly
    cross-entropy. ``num_classes`` is filled in from the task (2 for binary tasks)."""

    kinds = ("classification", "binary")

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__(num_classes=num_classes)
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.shift = nn.Parameter(torch.zeros(num_classes))
        self.log_weight = nn.Parameter(torch.zeros(num_classes))

    def forward(self, pred, target, **_):
        logits = binary_as_two_class(pred)
        if logits.shape[-1] != self.scale.shape[0]:
            raise ValueError(
                f"LogitAdjusted built for {self.scale.shape[0]} classes got "
                f"{logits.shape[-1]} logits"
            )
        y = one_hot(target, logits.shape[-1], logits.dtype)
        logp = torch.log_softmax(logits * self.scale + self.shift, dim=-1)
        return -(y * logp).sum(-1) * (y * self.log_weight.exp()).sum(-1)

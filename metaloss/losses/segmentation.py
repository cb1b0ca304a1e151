"""A learned segmentation loss: per-pixel BCE mixed with a focal-Tversky region term.

Salehi, Erdogmus, Gholipour, "Tversky loss function for image segmentation using 3D fully
convolutional deep networks", MLMI 2017; Abraham & Khan, "A Novel Focal Tversky Loss
Function with Improved Attention U-Net for Lesion Segmentation", ISBI 2019; the BCE + Dice
compound of Taghanaki et al., "Combo loss", CMIG 2019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metaloss.losses.base import ParametricLoss
from metaloss.losses.fixed import check_segmentation, overlaps

EPS = 1e-6  # the focal exponent's base is clamped here (for γ < 1) in the gradient only


def _softplus_inverse(y: float) -> float:
    """x with softplus(x) = y > 0, stable for small and large y."""
    return y + math.log(-math.expm1(-y))


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class LearnedTversky(ParametricLoss):
    """``scale · [w · BCE + (1 - w) · (1 - TI_{α,β})^γ]`` per image, with learned α, β ≥ 0,
    γ > 0 (softplus of ``raw_alpha``, ``raw_beta``, ``raw_gamma``) and mixing weight
    w ∈ (0, 1) (sigmoid of ``mix_logit``).

    BCE is the pixel mean; the Tversky index is written in Dice's form,
    TI = (2TP + s) / (2TP + 2α FP + 2β FN + s), so that at α = β = ½ the region term *is*
    :func:`metaloss.losses.fixed.dice` with the same ``smooth`` s (for other α, β it is
    :func:`~metaloss.losses.fixed.tversky` with smooth s/2). With γ = 1 the region term is
    exactly 1 - TI; otherwise its base is clamped at 1e-6 for the gradient (as
    ``focal_tversky``), never in the value for bases above it.

    The two weights sum to ``scale`` (fixed, default 2 = the 1 + 1 of ``bce_dice``):
    meta-learning moves emphasis between the pixel and the region term but cannot rescale
    the loss, which would amount to learning the inner learning rate. At the default
    initial φ (α = β = ½, γ = 1, w = ½) the loss equals
    :func:`metaloss.losses.fixed.bce_dice` (bce_weight 1, same ``smooth``).
    """

    kinds = ("segmentation",)

    def __init__(
        self,
        init_alpha: float = 0.5,
        init_beta: float = 0.5,
        init_gamma: float = 1.0,
        init_w: float = 0.5,
        scale: float = 2.0,
        smooth: float = 1.0,
    ) -> None:
        for name, v in (
            ("init_alpha", init_alpha),
            ("init_beta", init_beta),
            ("init_gamma", init_gamma),
            ("scale", scale),
        ):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"LearnedTversky: {name} must be a number > 0, got {v!r}")
        if not (isinstance(init_w, int | float) and 0 < init_w < 1):
            raise ValueError(
                f"LearnedTversky: init_w must be in (0, 1) (a sigmoid never reaches "
                f"its ends), got {init_w!r}"
            )
        if not (isinstance(smooth, int | float) and math.isfinite(smooth) and smooth >= 0):
            raise ValueError(f"LearnedTversky: smooth must be a number >= 0, got {smooth!r}")
        super().__init__(
            init_alpha=init_alpha,
            init_beta=init_beta,
            init_gamma=init_gamma,
            init_w=init_w,
            scale=scale,
            smooth=smooth,
        )
        self.scale, self.smooth = float(scale), float(smooth)  # fixed constants, not φ
        self.raw_alpha = nn.Parameter(torch.tensor(_softplus_inverse(float(init_alpha))))
        self.raw_beta = nn.Parameter(torch.tensor(_softplus_inverse(float(init_beta))))
        self.raw_gamma = nn.Parameter(torch.tensor(_softplus_inverse(float(init_gamma))))
        self.mix_logit = nn.Parameter(torch.tensor(_logit(float(init_w))))

    def coefficients(self) -> dict[str, torch.Tensor]:
        """α, β, γ and w as the loss uses them (for logging and reports)."""
        return {
            "alpha": F.softplus(self.raw_alpha),
            "beta": F.softplus(self.raw_beta),
            "gamma": F.softplus(self.raw_gamma),
            "w": torch.sigmoid(self.mix_logit),
        }

    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (pixel-mean BCE, focal-Tversky region term), each [B]."""
        check_segmentation("LearnedTversky", pred, target)
        c = self.coefficients()
        z = pred.reshape(pred.shape[0], -1)
        t = target.reshape(z.shape).to(z.dtype)
        bce = (t * F.softplus(-z) + (1.0 - t) * F.softplus(z)).mean(-1)
        tp, fp, fn = overlaps(pred, target)
        num = 2.0 * tp + self.smooth
        # ti <= 1 in floating point too (x / y <= 1 for x <= y), so the base is >= 0
        base = 1.0 - num / (num + 2.0 * c["alpha"] * fp + 2.0 * c["beta"] * fn)
        # base^γ as base · max(base, eps)^(γ-1): equal for base >= eps, exactly base when γ = 1,
        # and a finite gradient at base = 0 for γ < 1
        region = base * torch.exp((c["gamma"] - 1.0) * torch.log(base.clamp_min(EPS)))
        return bce, region

    def forward(self, pred, target, **_):
        bce, region = self.terms(pred, target)
        w = torch.sigmoid(self.mix_logit)
        return self.scale * (w * bce + (1.0 - w) * region)

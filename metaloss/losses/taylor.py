"""TaylorGLO: a loss that is a 3rd-order Taylor polynomial in (target, prediction).

Gonzalez & Miikkulainen, "Optimizing Loss Functions through Multivariate Taylor
Polynomial Parameterization", GECCO 2021 (arXiv:2002.00059).
"""

from __future__ import annotations

import torch
from torch import nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot

COEFFICIENTS = ("c_p", "c_pp", "c_ppp", "c_tp", "c_tpp", "c_ttp")


def ce_taylor_coefficients(t0: float, p0: float) -> dict[str, float]:
    """Coefficients of the 3rd-order expansion of -t log p around (t0, p0), p-dependent terms."""
    return {
        "c_p": -t0 / p0,
        "c_pp": t0 / p0**2,
        "c_ppp": -2 * t0 / p0**3,
        "c_tp": -1 / p0,
        "c_tpp": 1 / p0**2,
        "c_ttp": 0.0,
    }


class TaylorGLO(ParametricLoss):
    """f(t, p) = c_p δp + ½ c_pp δp² + ⅙ c_ppp δp³ + c_tp δt δp + ½ c_tpp δt δp²
    + ½ c_ttp δt² δp with δt = t - center_target, δp = p - center_pred: the eight parameters
    of TaylorGLO (a centre and the six coefficients of the terms that depend on the
    prediction; terms in t alone do not change gradients and are dropped).

    Classification: t is the one-hot target, p the softmax probability, summed over classes.
    Regression: t = y, p = ŷ, averaged over output dimensions.

    ``init``: ``ce`` — the Taylor expansion of cross-entropy -t log p around
    ``(center_target, center_pred)``; ``mse`` (alias ``brier``) — (p - t)² exactly, up to
    the dropped t² term (centre at 0); ``zeros``.
    """

    kinds = ("classification", "binary", "regression")
    # the parameters (set in __init__, the coefficients through setattr)
    center_target: nn.Parameter
    center_pred: nn.Parameter
    c_p: nn.Parameter
    c_pp: nn.Parameter
    c_ppp: nn.Parameter
    c_tp: nn.Parameter
    c_tpp: nn.Parameter
    c_ttp: nn.Parameter

    def __init__(
        self, init: str = "ce", center_target: float = 1.0, center_pred: float = 0.5
    ) -> None:
        super().__init__(init=init, center_target=center_target, center_pred=center_pred)
        if init == "ce":
            coefs = ce_taylor_coefficients(center_target, center_pred)
        elif init in ("mse", "brier"):
            center_target = center_pred = 0.0
            coefs = {**dict.fromkeys(COEFFICIENTS, 0.0), "c_pp": 2.0, "c_tp": -2.0}
        elif init == "zeros":
            coefs = dict.fromkeys(COEFFICIENTS, 0.0)
        else:
            raise ValueError(f"unknown TaylorGLO init {init!r}; valid: ce, mse, brier, zeros")
        self.center_target = nn.Parameter(torch.tensor(float(center_target)))
        self.center_pred = nn.Parameter(torch.tensor(float(center_pred)))
        for name in COEFFICIENTS:
            setattr(self, name, nn.Parameter(torch.tensor(float(coefs[name]))))

    def polynomial(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        dt, dp = t - self.center_target, p - self.center_pred
        return (
            self.c_p * dp
            + 0.5 * self.c_pp * dp**2
            + self.c_ppp * dp**3 / 6
            + self.c_tp * dt * dp
            + 0.5 * self.c_tpp * dt * dp**2
            + 0.5 * self.c_ttp * dt**2 * dp
        )

    def forward(self, pred, target, **_):
        if target.is_floating_point():
            f = self.polynomial(
                target.reshape(target.shape[0], -1), pred.reshape(pred.shape[0], -1)
            )
            return f.mean(-1)
        logits = binary_as_two_class(pred)
        p = torch.softmax(logits, dim=-1)
        return self.polynomial(one_hot(target, logits.shape[-1], p.dtype), p).sum(-1)

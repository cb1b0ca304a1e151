"""Losses: the fixed catalogue (:mod:`metaloss.losses.fixed`) and parametric families."""

from metaloss.losses.base import ParametricLoss, fits, loss_kinds

__all__ = ["ParametricLoss", "fits", "loss_kinds"]

"""Functional, differentiable inner optimizers (see :mod:`metaloss.inner.optimizers`)."""

from metaloss.inner.optimizers import InnerOptimizer

__all__ = ["InnerOptimizer"]

"""Hypergradient methods, one per file, sharing ``method(problem, meta, batch)``.

Chosen with Hydra (``hypergrad=unrolled|truncated|first_order|higher``)."""

from metaloss.hypergrad.base import HyperGrad, MetaBatch, MetaProblem, meta_params

__all__ = ["HyperGrad", "MetaBatch", "MetaProblem", "meta_params"]

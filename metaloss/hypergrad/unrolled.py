"""Reverse-mode differentiation through all K inner steps, vmapped over the tasks.

The ML3 hypergradient (Bechtle et al., ICPR 2021) and MAML's second-order unrolling
(Finn et al., ICML 2017), written with ``torch.func`` (``grad`` of ``vmap`` of ``grad``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metaloss.hypergrad.base import HyperGrad, MetaBatch, MetaProblem, Params, functional_hypergrad


class Unrolled:
    """``compile=True`` wraps the fully functional step in ``torch.compile`` (opt-in; the
    first call compiles, later calls with the same shapes reuse the graph)."""

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        # at most one entry: id(problem) -> its compiled hypergradient
        self._compiled: dict[int, Callable[[Params, MetaBatch], HyperGrad]] = {}

    def _kwargs(self, problem: MetaProblem) -> dict:
        return {}

    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        kw = self._kwargs(problem)
        if not self.compile:
            return functional_hypergrad(problem, meta, batch, **kw)
        fn = self._compiled.get(id(problem))
        if fn is None:
            fn = torch.compile(
                lambda m, b: functional_hypergrad(problem, m, b, **kw), dynamic=False
            )
            self._compiled = {id(problem): fn}
        return fn(meta, batch)

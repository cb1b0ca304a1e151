"""Truncated backpropagation: differentiate only the last ``k`` of the K inner steps.

Shaban, Cheng, Hatch, Boots, "Truncated Back-propagation for Bilevel Optimization",
AISTATS 2019. With ``k = K`` it is exactly :class:`~metaloss.hypergrad.unrolled.Unrolled`.
"""

from __future__ import annotations

from metaloss.hypergrad.unrolled import Unrolled


class Truncated(Unrolled):
    def __init__(self, k: int = 1, compile: bool = False) -> None:
        if k < 1:
            raise ValueError(f"truncated hypergradient needs k >= 1 steps, got {k}")
        super().__init__(compile=compile)
        self.k = k

    def _kwargs(self, problem):
        return {"differentiable_from": max(0, problem.inner_steps - self.k)}

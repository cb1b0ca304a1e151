"""First-order hypergradient: keep ∂(update)/∂φ at each step, drop what flows through
θ's history (the Hessian-vector products), as first-order MAML (Finn et al. 2017) and
Reptile-style approximations do. Cheaper; exact when K = 1."""

from __future__ import annotations

from metaloss.hypergrad.unrolled import Unrolled


class FirstOrder(Unrolled):
    def _kwargs(self, problem):
        return {"first_order": True}

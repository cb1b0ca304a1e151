"""Evolution strategies: a hypergradient estimate that needs no derivative of the objective.

Antithetic Gaussian ES (Salimans, Ho, Chen, Sidor, Sutskever, "Evolution Strategies as a
Scalable Alternative to Reinforcement Learning", 2017): for ε_i ~ N(0, I),
    ĝ = Σ_i [M(φ + σ ε_i) - M(φ - σ ε_i)] ε_i / (2 σ P),
the gradient of the Gaussian-smoothed objective. Because M is only evaluated, it may be
the *true* validation metric — e.g. the error rate, as TaylorGLO (Gonzalez &
Miikkulainen 2021) optimises accuracy with CMA-ES — instead of a differentiable surrogate.
Each evaluation runs the T inner loops as one ``vmap``; no second-order terms are needed.
"""

from __future__ import annotations

import dataclasses

import torch

from metaloss.hypergrad.base import (
    HyperGrad,
    MetaBatch,
    MetaProblem,
    Params,
    batched_objective,
    detach,
)
from metaloss.metrics import zero_one_error

OBJECTIVES = {"error": zero_one_error}


class EvolutionStrategies:
    """``population`` antithetic pairs, perturbation scale ``sigma``; ``objective``: None (the
    run's ``meta.objective``) or ``error`` (0-1 validation error, not differentiable).
    The noise comes from a generator seeded by ``seed`` and the call count (its state)."""

    def __init__(self, population: int = 16, sigma: float = 0.05, objective: str | None = None,
                 seed: int = 0) -> None:
        if population < 1 or sigma <= 0:
            raise ValueError(f"ES needs population >= 1 and sigma > 0, got {population}, {sigma}")
        if objective is not None and objective not in OBJECTIVES:
            raise ValueError(f"unknown ES objective {objective!r}; valid: None, {', '.join(OBJECTIVES)}")
        self.population, self.sigma, self.objective, self.seed = population, sigma, objective, seed
        self.calls = 0

    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        if self.objective is not None:
            problem = dataclasses.replace(problem, objective=OBJECTIVES[self.objective])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        base = detach(meta)
        grads = {k: torch.zeros_like(v) for k, v in base.items()}
        total = torch.zeros((), device=batch.x_val.device, dtype=batch.x_val.dtype)
        for _ in range(self.population):
            # noise drawn on the CPU generator: the same perturbations on every device
            eps = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in base.items()}
            plus = batched_objective(problem, {k: v + self.sigma * eps[k] for k, v in base.items()}, batch)
            minus = batched_objective(problem, {k: v - self.sigma * eps[k] for k, v in base.items()}, batch)
            scale = (plus - minus).detach() / (2 * self.sigma * self.population)
            for k in grads:
                grads[k] = grads[k] + scale * eps[k]
            total = total + (plus + minus).detach() / (2 * self.population)
        return HyperGrad(total, grads)

    # The noise of call n depends on n: checkpointed, so a resumed run draws the same noise.
    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

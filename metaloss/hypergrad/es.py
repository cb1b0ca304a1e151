"""Evolution strategies: a hypergradient estimate that needs no derivative of the objective.

Antithetic Gaussian ES (Salimans, Ho, Chen, Sidor, Sutskever, "Evolution Strategies as a
Scalable Alternative to Reinforcement Learning", 2017): for ε_i ~ N(0, I),
    ĝ = Σ_i [M(φ + σ ε_i) - M(φ - σ ε_i)] ε_i / (2 σ P),
the gradient of the Gaussian-smoothed objective. Because M is only evaluated, it may be
the *true* validation metric — e.g. the error rate, as TaylorGLO (Gonzalez &
Miikkulainen 2021) optimises accuracy with CMA-ES — instead of a differentiable surrogate.

The whole population is one ``vmap``: the 2P perturbed φ (φ + σε_1..φ + σε_P, then
φ - σε_1..φ - σε_P) are stacked and ``batched_objective`` (itself a ``vmap`` over the T
tasks) is vmapped over them, so one call runs all 2P × T inner loops; ``chunk`` bounds
how many candidates go into one call (memory grows with it). No second-order terms are
needed, so it runs under ``no_grad``. ``vectorize=False`` is the reference loop over
candidates; an objective or loss that cannot run under ``vmap`` falls back to it, with a
warning naming them. Both draw the same noise in the same order, so they agree up to
float rounding. A candidate whose objective is not finite (its inner training diverged; the
true metrics are NaN then, see :func:`metaloss.metrics.nan_where_diverged`) counts as the
worst finite candidate of its step.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

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
KINDS = {"error": ("classification", "binary")}  # the task kinds each objective means something for


def _name(obj) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


class EvolutionStrategies:
    """``population`` antithetic pairs, perturbation scale ``sigma``; ``objective``: None (the
    run's ``meta.objective``) or ``error`` (0-1 validation error, not differentiable).
    The noise comes from a generator seeded by ``seed`` and the call count (its state).
    ``chunk``: candidates per ``vmap`` call (None: all 2P at once); ``vectorize``: False
    evaluates the candidates one by one (the reference loop)."""

    def __init__(
        self,
        population: int = 16,
        sigma: float = 0.05,
        objective: str | None = None,
        seed: int = 0,
        chunk: int | None = None,
        vectorize: bool = True,
    ) -> None:
        if population < 1 or sigma <= 0:
            raise ValueError(f"ES needs population >= 1 and sigma > 0, got {population}, {sigma}")
        if objective is not None and objective not in OBJECTIVES:
            raise ValueError(
                f"unknown ES objective {objective!r}; valid: None, {', '.join(OBJECTIVES)}"
            )
        if chunk is not None and chunk < 1:
            raise ValueError(f"ES chunk must be None or >= 1, got {chunk}")
        self.population, self.sigma, self.objective, self.seed = population, sigma, objective, seed
        self.chunk, self.vectorize = chunk, vectorize
        self.calls = 0
        self._failure: str | None = None  # why the last estimate is not finite (see diagnosis)
        self._no_vmap: set[tuple[str, str]] = (
            set()
        )  # (loss, objective) pairs that failed under vmap

    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        if self.objective is not None:
            problem = dataclasses.replace(problem, objective=OBJECTIVES[self.objective])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        base = detach(meta)
        p = self.population
        # noise drawn on the CPU generator, candidate by candidate and key by key (the order
        # of the original loop): the same perturbations on every device and every rank
        draws = [
            {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
            for _ in range(p)
        ]
        eps = {
            k: torch.stack([d[k] for d in draws]).to(v.device) for k, v in base.items()
        }  # [P, ...]
        with torch.no_grad():
            values = self._evaluate(problem, base, eps, batch)  # [2P]: plus then minus
        finite = torch.isfinite(values)
        self._failure = None
        if not bool(finite.any()):
            self._failure = (
                f"every one of the {len(values)} ES candidates φ ± σε "
                f"(hypergrad.sigma = {self.sigma:g}, "
                f"hypergrad.population = {p}) diverged, so there is no estimate"
            )
        if bool(finite.any()) and not bool(finite.all()):
            # a diverged candidate counts as the worst finite one (CMA-ES ranks it last too): one
            # unstable perturbation must not turn the whole estimate NaN and skip the step; if
            # every candidate diverged the estimate stays NaN and the step is skipped
            warnings.warn(
                f"ES: {int((~finite).sum())} of {len(values)} candidates diverged; each counts as "
                "the worst finite candidate",
                RuntimeWarning,
                stacklevel=2,
            )
            values = torch.where(finite, values, values[finite].max())
        plus, minus = values[:p], values[p:]
        # reduced in the loop's order, so the only difference from the loop is the evaluation
        grads = {k: torch.zeros_like(v) for k, v in base.items()}
        total = torch.zeros((), device=batch.x_val.device, dtype=batch.x_val.dtype)
        for i in range(p):
            scale = (plus[i] - minus[i]) / (2 * self.sigma * p)
            for k in grads:
                grads[k] = grads[k] + scale * eps[k][i]
            total = total + (plus[i] + minus[i]) / (2 * p)
        return HyperGrad(total, grads)

    def _evaluate(
        self, problem: MetaProblem, base: Params, eps: Params, batch: MetaBatch
    ) -> Tensor:
        """M at the 2P candidates φ + σε_1..φ + σε_P, φ - σε_1..φ - σε_P (each a mean over T)."""
        cands = {
            k: torch.cat([v + self.sigma * eps[k], v - self.sigma * eps[k]])
            for k, v in base.items()
        }
        key = (_name(type(problem.loss)), _name(problem.objective))
        if self.vectorize and key not in self._no_vmap:
            try:
                return torch.vmap(
                    lambda m: batched_objective(problem, m, batch), chunk_size=self.chunk
                )(cands)
            except torch.OutOfMemoryError:
                raise  # not a vmap limitation: lower `chunk` (candidates per vmap call)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                self._no_vmap.add(key)
                warnings.warn(
                    f"ES: loss {key[0]} with objective {key[1]} cannot run under vmap over "
                    f"candidates ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); "
                    "falling back to a loop over candidates",
                    RuntimeWarning,
                    stacklevel=3,
                )
        n = next(iter(cands.values())).shape[0]
        return torch.stack(
            [
                batched_objective(problem, {k: v[c] for k, v in cands.items()}, batch)
                for c in range(n)
            ]
        )

    def diagnosis(self) -> tuple[str, str, str] | None:
        """``(cause, finding, fix)`` when the last estimate is not finite because every
        candidate diverged. The learner blames σ only when φ itself trains finitely on that
        batch (else the inner training diverges anyway)."""
        if self._failure is None:
            return None
        return (
            "es",
            self._failure,
            (
                f"The perturbations leave φ's stable region: lower hypergrad.sigma "
                f"(now {self.sigma:g})."
            ),
        )

    # The noise of call n depends on n: checkpointed, so a resumed run draws the same noise.
    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

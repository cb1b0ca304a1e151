"""Training a policy with a policy loss, and searching a learned policy loss with CMA-ES.

Seed streams: a training run with seed ``s`` initialises its policy from ``s``; update ``u``'s
episodes, the evaluation episodes and the validation episodes take their reset and action seeds
from ``numpy.random.SeedSequence([stream, s, u])`` with streams 0, 1 and 2, so they never share
a seed by construction (a plain offset would: ``s * K + u`` meets ``EVAL + s'`` for some s). The
meta-test trains seeds ``0 ..``, tuning ``TUNE_SEEDS ..`` and the search's fitness
``SEARCH_SEEDS ..``, so no search or tuning run shares an initialisation with a test run.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from metaloss.cmaes import CMAES
from metaloss.losses.base import LossContractError
from metaloss.rl.env import Episodes, collect

log = logging.getLogger("metaloss")

TRAIN_STREAM, EVAL_STREAM, VAL_STREAM = 0, 1, 2
TUNE_SEEDS = 20_000
SEARCH_SEEDS = 50_000
OBS_DIM, N_ACTIONS = 4, 2  # CartPole


@dataclass(frozen=True)
class Budget:
    """One policy-training run: ``updates`` Adam steps, each on ``episodes`` fresh episodes of
    at most ``max_steps`` steps; returns are discounted by ``gamma`` for the advantages; the
    trained policy is scored on ``eval_episodes`` episodes."""

    env: str = "cartpole"
    updates: int = 40
    episodes: int = 16
    max_steps: int = 200
    eval_episodes: int = 32
    gamma: float = 0.99
    hidden: int = 32

    def __post_init__(self) -> None:
        for key, low in (
            ("updates", 1),
            ("episodes", 2),  # the baseline of an episode is the mean of the others
            ("max_steps", 1),
            ("eval_episodes", 1),
            ("hidden", 1),
        ):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"task.{key} = {v!r}: must be an integer >= {low}")
        if isinstance(self.gamma, bool) or not 0 < self.gamma <= 1:
            raise ValueError(f"task.gamma = {self.gamma!r}: must be in (0, 1]")

    @property
    def steps_per_run(self) -> int:
        """The most environment steps a run can take (its compute, for budget accounting)."""
        return self.updates * self.episodes * self.max_steps


def make_policy(hidden: int, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, N_ACTIONS))


def stream_seed(stream: int, seed: int, step: int = 0) -> int:
    """A 31-bit seed of ``(stream, seed, step)`` (NumPy's SeedSequence: distinct tuples give
    independent seeds)."""
    return int(np.random.SeedSequence([stream, seed, step]).generate_state(1)[0] >> 1)


def advantages(ep: Episodes, gamma: float) -> Tensor:
    """Return-to-go minus a leave-one-out baseline — the mean return-to-go at that time step of
    the *other* episodes still running, so an episode's own return never lowers its own
    advantage (a step no other episode reached gets no baseline: its return-to-go itself) —
    divided by the spread of the result over all steps (the baseline of :func:`reinforce`)."""
    g, m = ep.returns_to_go(gamma), ep.mask.to(torch.float32)
    total, alive = (g * m).sum(0), m.sum(0)
    others = (alive - m).clamp_min(1)
    baseline = torch.where(alive - m > 0, (total - g * m) / others, torch.zeros_like(g))
    a = (g - baseline) * m
    std = ((a**2).sum() / m.sum().clamp_min(1)).sqrt().clamp_min(1e-6)
    return a / std


def train_policy(
    loss: Callable[..., Tensor], budget: Budget, *, lr: float, seed: int
) -> dict[str, object]:
    """Train a fresh policy with ``loss``; returns ``{"return": the trained policy's mean return
    over ``eval_episodes`` evaluation episodes (NaN if the loss diverged), "val_return": the
    same over another set of episodes (the validation stream: what a choice between losses
    may read before the test), "curve": mean return of each update's episodes}``."""
    if not (isinstance(lr, float | int) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"rl lr = {lr!r}: must be a finite number > 0")
    policy = make_policy(budget.hidden, seed)
    opt = torch.optim.Adam(policy.parameters(), lr=float(lr))
    curve: list[float] = []
    for u in range(budget.updates):
        ep = collect(
            policy,
            budget.env,
            budget.episodes,
            budget.max_steps,
            stream_seed(TRAIN_STREAM, seed, u),
        )
        curve.append(float(ep.returns.mean()))
        logits = policy(ep.obs)
        logp = torch.log_softmax(logits, -1).gather(-1, ep.actions[..., None]).squeeze(-1)
        t = torch.arange(ep.obs.shape[1], dtype=torch.float32) / budget.max_steps
        per_step = loss(logp, advantages(ep, budget.gamma), t.expand_as(logp))
        if not isinstance(per_step, Tensor) or per_step.shape != logp.shape:
            shape = tuple(per_step.shape) if isinstance(per_step, Tensor) else type(per_step)
            raise LossContractError(
                f"a policy loss must give one value per step, shaped like log π {tuple(logp.shape)}"
                f" (episodes x steps), got {shape}"
            )
        objective = (per_step * ep.mask).sum(-1).mean()
        if not torch.isfinite(objective):
            return {"return": float("nan"), "val_return": float("nan"), "curve": curve}
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()

    def score(stream: int) -> float:
        ep = collect(
            policy, budget.env, budget.eval_episodes, budget.max_steps, stream_seed(stream, seed)
        )
        return float(ep.returns.mean())

    return {"return": score(EVAL_STREAM), "val_return": score(VAL_STREAM), "curve": curve}


def mean_return(loss: Callable[..., Tensor], budget: Budget, lr: float, seeds: list[int]) -> float:
    """Mean final return over ``seeds`` (NaN if any run diverged)."""
    values = [float(train_policy(loss, budget, lr=lr, seed=s)["return"]) for s in seeds]  # type: ignore[arg-type]
    return float(np.mean(values))


@dataclass
class SearchResult:
    loss: nn.Module
    history: list[dict] = field(default_factory=list)


def search(
    loss: nn.Module,
    budget: Budget,
    *,
    lr: float,
    generations: int,
    seeds: int = 2,
    sigma0: float = 0.1,
    popsize: int | None = None,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> SearchResult:
    """CMA-ES over φ (:class:`metaloss.cmaes.CMAES`, on its private RNG): a candidate's fitness
    is minus the mean final return of policies trained with it from ``seeds`` initialisations,
    the same seeds for every candidate of a generation (common random numbers) and new ones
    each generation, so the search cannot fit one draw. ``loss`` ends at CMA's final mean."""
    if not isinstance(generations, int) or generations < 1:
        raise ValueError(f"rl.generations = {generations!r}: must be an integer >= 1")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"rl.search_seeds = {seeds!r}: must be an integer >= 1")
    es = CMAES(loss, sigma0=sigma0, popsize=popsize, seed=seed)
    candidate = copy.deepcopy(loss)
    shadow = CMAES(candidate, sigma0=sigma0, popsize=2, seed=seed)  # maps a row onto a copy
    out = SearchResult(loss)
    for g in range(generations):
        gen_seeds = [SEARCH_SEEDS + seed * 10_007 + g * seeds + j for j in range(seeds)]

        def evaluate(cands: np.ndarray, gen_seeds: list[int] = gen_seeds) -> list[float]:
            fitness = []
            for row in cands:
                shadow.set_candidate(row)
                r = mean_return(candidate, budget, lr, gen_seeds)
                fitness.append(-r if math.isfinite(r) else float("nan"))
            return fitness

        es.generation(evaluate)
        told = es.history[-1]
        finite = [f for f in told if math.isfinite(f)]
        row = {
            "generation": g + 1,
            "best_return": -min(finite) if finite else float("nan"),
            "mean_return": -float(np.mean(finite)) if finite else float("nan"),
            "diverged": len(told) - len(finite),
            "sigma": es.sigma,
        }
        out.history.append(row)
        if progress is not None:
            progress(row)
    return out

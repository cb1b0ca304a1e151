"""The two-player inner loop, the measures, and the CMA-ES search over a learned GAN loss.

Data: the ring of 8 Gaussians of Metz et al. ("Unrolled Generative Adversarial Networks", ICLR
2017): means on a circle of radius 2, standard deviation 0.02. A sample is *high quality* when it
lies within 3σ of a mode; a mode is *covered* when at least 1% of the samples are high-quality
samples of it. The Fréchet distance (Heusel et al. 2017) compares the means and covariances of
real and generated samples; on 2-D data the samples themselves are the features. MNIST-1D
signals (``Budget(data="mnist1d")``, :mod:`metaloss.gan.mnist1d`) are measured on a
classifier's features instead.

Two players, two optimizers: :func:`train_gan` builds one Adam per player and runs, per
generator step, ``loss.d_steps`` discriminator steps (plus ``loss.gp_weight`` × the gradient
penalty); nothing else about a loss is special-cased.

Seeds (disjoint streams): a run with seed ``s`` initialises both players from ``s`` and draws
its real samples and noise from generator ``s``; its measures use noise seeds ``TEST_NOISE + s``
(test) and ``VAL_NOISE + s`` (validation). The meta-test trains seeds 0.., tuning
``TUNE_SEEDS`` .., the search ``SEARCH_SEEDS`` ...
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from metaloss.cmaes import CMAES
from metaloss.gan.frechet import frechet_distance
from metaloss.gan.losses import gradient_penalty
from metaloss.losses.base import LossContractError

MODES, RADIUS, STD = 8, 2.0, 0.02
TEST_NOISE, VAL_NOISE = 1_000_000, 2_000_000
TUNE_SEEDS, SEARCH_SEEDS = 20_000, 50_000


def ring_means() -> Tensor:
    angle = torch.arange(MODES, dtype=torch.float32) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angle.cos(), angle.sin()], -1)


def sample_ring(n: int, generator: torch.Generator) -> Tensor:
    mode = torch.randint(0, MODES, (n,), generator=generator)
    return ring_means()[mode] + STD * torch.randn(n, 2, generator=generator)


@dataclass(frozen=True)
class Budget:
    """One GAN training run: ``steps`` generator updates on batches of ``batch``; ``z_dim``
    noise dimensions; players of ``hidden`` units (two ReLU layers); measured on ``samples``
    generated points of ``data`` (:data:`DATA`: ``ring``, ``mnist1d``)."""

    steps: int = 1500
    batch: int = 128
    z_dim: int = 16
    hidden: int = 64
    samples: int = 2500
    data: str = "ring"

    def __post_init__(self) -> None:
        for key, low in (("steps", 1), ("batch", 1), ("z_dim", 1), ("hidden", 1), ("samples", 2)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"task.{key} = {v!r}: must be an integer >= {low}")
        if self.data not in DATA:
            raise ValueError(f"task.data = {self.data!r}: one of {', '.join(DATA)}")


def players(budget: Budget, seed: int) -> tuple[nn.Module, nn.Module]:
    h, d = budget.hidden, real_data(budget.data).dim
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = nn.Sequential(
            nn.Linear(budget.z_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
        )
        disc = nn.Sequential(
            nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1)
        )
    return gen, disc


def measures(points: Tensor, real: Tensor) -> dict[str, float]:
    """``modes`` covered (of 8), ``high_quality`` fraction and ``frechet`` distance to ``real``;
    NaN everywhere for non-finite points (a diverged generator)."""
    if not torch.isfinite(points).all():
        return {"modes": float("nan"), "high_quality": float("nan"), "frechet": float("nan")}
    d = torch.cdist(points, ring_means())
    nearest = d.argmin(-1)
    good = d.min(-1).values <= 3 * STD
    per_mode = torch.bincount(nearest[good], minlength=MODES)
    return {
        "modes": float((per_mode >= 0.01 * len(points)).sum()),
        "high_quality": float(good.float().mean()),
        "frechet": frechet_distance(points, real),
    }


class Ring:
    """The ring of 8 Gaussians: real samples drawn fresh from the mixture for training and for
    each split's measures (:func:`measures`)."""

    name, dim = "ring", 2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return sample_ring(n, generator)

    def reference(self, n: int, generator: torch.Generator, split: str) -> Tensor:
        return sample_ring(n, generator)

    def measures(self, points: Tensor, real: Tensor) -> dict[str, float]:
        return measures(points, real)


class RealData(Protocol):
    """What a GAN learns to generate: ``dim`` numbers per point, real points to train on
    (``sample``), real points of a split (``test`` / ``val``) to measure against
    (``reference``), and the measures ``modes``, ``high_quality`` and ``frechet``."""

    name: str
    dim: int

    def sample(self, n: int, generator: torch.Generator) -> Tensor: ...

    def reference(self, n: int, generator: torch.Generator, split: str) -> Tensor: ...

    def measures(self, points: Tensor, real: Tensor) -> dict[str, float]: ...


DATA = ("ring", "mnist1d")


@functools.cache
def real_data(name: str) -> RealData:
    """The :class:`RealData` called ``name`` (one of :data:`DATA`), built once per process
    (MNIST-1D's data set and feature classifier take a few seconds)."""
    if name == "ring":
        return Ring()
    if name == "mnist1d":
        from metaloss.gan.mnist1d import Mnist1dData

        return Mnist1dData()
    raise ValueError(f"gan.data = {name!r}: one of {', '.join(DATA)}")


def train_gan(
    loss: Any, budget: Budget, *, lr: float, seed: int, points: list | None = None
) -> dict[str, float]:
    """Train a generator and a discriminator with ``loss`` (a :class:`metaloss.gan.losses.
    GANLoss` or :class:`~metaloss.gan.losses.LearnedGANLoss`), one Adam (β = 0.5, 0.999) per
    player at ``lr``; returns the test measures (``modes``, ``high_quality``, ``frechet``) and
    their ``val_`` twins on other noise. ``points``: a list that receives the generated test
    points (for a figure)."""
    if not (isinstance(lr, float | int) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"gan lr = {lr!r}: must be a finite number > 0")
    gen, disc = players(budget, seed)
    data = real_data(budget.data)
    opt_g = torch.optim.Adam(gen.parameters(), lr=float(lr), betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(lr), betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)

    def noise(n: int, generator: torch.Generator = g) -> Tensor:
        return torch.randn(n, budget.z_dim, generator=generator)

    for _ in range(budget.steps):
        for _ in range(int(loss.d_steps)):
            real, fake = data.sample(budget.batch, g), gen(noise(budget.batch)).detach()
            d_obj = _per_example(
                loss.discriminator(disc(real).squeeze(-1), disc(fake).squeeze(-1)), "discriminator"
            )
            if loss.gp_weight:
                d_obj = d_obj + loss.gp_weight * gradient_penalty(disc, real, fake, g)
            d_obj = d_obj.mean()
            if not torch.isfinite(d_obj):
                return _diverged()
            opt_d.zero_grad(set_to_none=True)
            d_obj.backward()
            opt_d.step()
        g_obj = _per_example(
            loss.generator(disc(gen(noise(budget.batch))).squeeze(-1)), "generator"
        ).mean()
        if not torch.isfinite(g_obj):
            return _diverged()
        opt_g.zero_grad(set_to_none=True)
        g_obj.backward()
        opt_g.step()
    out = {}
    with torch.no_grad():
        for prefix, stream in (("", TEST_NOISE), ("val_", VAL_NOISE)):
            gz = torch.Generator().manual_seed(stream + seed)
            pts = gen(noise(budget.samples, gz))
            real = data.reference(budget.samples, gz, "val" if prefix else "test")
            if points is not None and not prefix:
                points.append(pts)
            out.update({prefix + k: v for k, v in data.measures(pts, real).items()})
    return out


def _per_example(value: Any, player: str) -> Tensor:
    """A player's objective: one value per example of the batch (the loss contract)."""
    if not isinstance(value, Tensor) or value.dim() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise LossContractError(
            f"a GAN loss's {player} objective must give one value per example (shape [batch]), "
            f"got {shape}"
        )
    return value


def _diverged() -> dict[str, float]:
    nan = float("nan")
    return {k: nan for p in ("", "val_") for k in (p + "modes", p + "high_quality", p + "frechet")}


def mean_measure(loss: Any, budget: Budget, lr: float, seeds: list[int], key: str) -> float:
    return float(np.mean([train_gan(loss, budget, lr=lr, seed=s)[key] for s in seeds]))


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
    seeds: int = 1,
    sigma0: float = 0.3,
    popsize: int | None = None,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> SearchResult:
    """CMA-ES over the learned loss's weights on the validation Fréchet distance (lower is
    better) of GANs trained with each candidate, every candidate of a generation from the same
    new seeds (common random numbers). ``loss`` ends at CMA's final mean."""
    if not isinstance(generations, int) or generations < 1:
        raise ValueError(f"gan.generations = {generations!r}: must be an integer >= 1")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"gan.search_seeds = {seeds!r}: must be an integer >= 1")
    es = CMAES(loss, sigma0=sigma0, popsize=popsize, seed=seed)
    candidate = copy.deepcopy(loss)
    shadow = CMAES(candidate, sigma0=sigma0, popsize=2, seed=seed)
    out = SearchResult(loss)
    for gen_i in range(generations):
        gen_seeds = [SEARCH_SEEDS + seed * 10_007 + gen_i * seeds + j for j in range(seeds)]

        def evaluate(cands: np.ndarray, gen_seeds: list[int] = gen_seeds) -> list[float]:
            fitness = []
            for row in cands:
                shadow.set_candidate(row)
                fitness.append(mean_measure(candidate, budget, lr, gen_seeds, "val_frechet"))
            return fitness

        es.generation(evaluate)
        finite = [f for f in es.history[-1] if math.isfinite(f)]
        row = {
            "generation": gen_i + 1,
            "best_frechet": min(finite) if finite else float("nan"),
            "median_frechet": float(np.median(finite)) if finite else float("nan"),
            "diverged": len(es.history[-1]) - len(finite),
            "sigma": es.sigma,
        }
        out.history.append(row)
        if progress is not None:
            progress(row)
    return out

"""GAN losses as pairs: ``discriminator(d_real, d_fake) -> [B]`` and ``generator(d_fake) -> [B]``
of the discriminator's logits, plus how the two-player loop must run them: ``d_steps``
discriminator updates per generator update and the weight of a gradient penalty (computed by the
loop, which holds the discriminator; :func:`gradient_penalty`).

A new fixed loss is one function returning a :class:`GANLoss`, decorated ``@fits("gan")``, and
one YAML in ``conf/loss/`` naming it (``_target_: mypkg.my_gan``; its arguments are the loss's
hyper-parameters): ``metaloss-train task=gan_ring loss=my_gan`` (docs/gan.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from metaloss.losses.base import ParametricLoss, fits


@dataclass(frozen=True)
class GANLoss:
    """A fixed GAN loss: the two players' objectives (per example, minimised) and the loop's
    settings."""

    name: str
    discriminator: Callable[[Tensor, Tensor], Tensor]
    generator: Callable[[Tensor], Tensor]
    d_steps: int = 1
    gp_weight: float = 0.0
    kinds: ClassVar[frozenset[str]] = frozenset({"gan"})

    def __post_init__(self) -> None:
        if isinstance(self.d_steps, bool) or not isinstance(self.d_steps, int) or self.d_steps < 1:
            raise ValueError(f"loss.d_steps = {self.d_steps!r}: must be an integer >= 1")
        gp = self.gp_weight
        if isinstance(gp, bool) or not (isinstance(gp, float | int) and 0 <= gp < float("inf")):
            raise ValueError(f"loss.gp_weight = {self.gp_weight!r}: must be a finite number >= 0")


def _sp(x: Tensor) -> Tensor:
    return F.softplus(x)


@fits("gan")
def minimax() -> GANLoss:
    """Goodfellow et al. 2014: D maximises log D(x) + log(1 - D(G(z))), G minimises
    log(1 - D(G(z)))."""
    return GANLoss("minimax", lambda r, f: _sp(-r) + _sp(f), lambda f: -_sp(f))


@fits("gan")
def non_saturating() -> GANLoss:
    """The same paper's non-saturating generator loss, -log D(G(z))."""
    return GANLoss("non_saturating", lambda r, f: _sp(-r) + _sp(f), lambda f: _sp(-f))


@fits("gan")
def hinge() -> GANLoss:
    """Hinge loss (Lim & Ye 2017; Miyato et al. 2018)."""
    return GANLoss("hinge", lambda r, f: F.relu(1 - r) + F.relu(1 + f), lambda f: -f)


@fits("gan")
def least_squares() -> GANLoss:
    """Least squares (Mao et al. 2017), targets a = 0, b = c = 1."""
    return GANLoss(
        "least_squares", lambda r, f: 0.5 * (r - 1) ** 2 + 0.5 * f**2, lambda f: 0.5 * (f - 1) ** 2
    )


@fits("gan")
def wgan_gp(gp_weight: float = 10.0, d_steps: int = 5) -> GANLoss:
    """WGAN-GP (Gulrajani et al. 2017): critic -D(x) + D(G(z)) + λ (||∇D(x̂)|| - 1)², n_critic
    critic steps per generator step (λ = 10, n_critic = 5 in the paper)."""
    return GANLoss(
        "wgan_gp", lambda r, f: f - r, lambda f: -f, d_steps=d_steps, gp_weight=gp_weight
    )


# the fixed losses at their papers' settings, by name (the recorded comparison's rows)
FIXED: dict[str, GANLoss] = {
    f.__name__: f() for f in (minimax, non_saturating, hinge, least_squares, wgan_gp)
}


def gradient_penalty(
    disc: torch.nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator
) -> Tensor:
    """WGAN-GP's penalty per example, ``(||∇_x̂ D(x̂)||₂ - 1)²`` at x̂ = ε x + (1 - ε) x̃ with
    ε ~ U[0, 1] per example (Gulrajani et al. 2017, Algorithm 1)."""
    eps = torch.rand(real.shape[0], 1, generator=generator, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return (grad.norm(dim=-1) - 1) ** 2


class LearnedGANLoss(ParametricLoss):
    """A learned GAN loss: each player's objective a weighted sum of the fixed losses' terms,

    D: ``a_1 softplus(-r) + a_2 relu(1 - r) + a_3 (r - 1)²/2 + b_1 softplus(f) + b_2 relu(1 + f)
    + b_3 f²/2``;  G: ``c_1 softplus(-f) - c_2 f + c_3 (f - 1)²/2``,

    nine named weights starting at the non-saturating GAN (a_1 = b_1 = c_1 = 1, the rest 0):
    the family holds the non-saturating, hinge and least-squares losses and every mixture of
    them, so a search starts at a known loss and moves by evidence (small enough for CMA-ES)."""

    kinds = ("gan",)
    d_steps = 1
    gp_weight = 0.0
    name = "learned"

    def __init__(self) -> None:
        super().__init__()
        self.d_real = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.d_fake = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.g_fake = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    def discriminator(self, r: Tensor, f: Tensor) -> Tensor:
        real = torch.stack([_sp(-r), F.relu(1 - r), 0.5 * (r - 1) ** 2], -1)
        fake = torch.stack([_sp(f), F.relu(1 + f), 0.5 * f**2], -1)
        return real @ self.d_real + fake @ self.d_fake

    def generator(self, f: Tensor) -> Tensor:
        return torch.stack([_sp(-f), -f, 0.5 * (f - 1) ** 2], -1) @ self.g_fake

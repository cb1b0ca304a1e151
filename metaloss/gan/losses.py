"""GAN losses as pairs: ``discriminator(d_real, d_fake) -> [B]`` and ``generator(d_fake) -> [B]``
of the discriminator's logits, plus how the two-player loop must run them: ``d_steps``
discriminator updates per generator update and the weight of a gradient penalty (computed by the
loop, which holds the discriminator; :func:`gradient_penalty`). A new loss is one such object and
one line in :data:`FIXED`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GANLoss:
    """A fixed GAN loss: the two players' objectives (per example, minimised) and the loop's
    settings."""

    name: str
    discriminator: Callable[[Tensor, Tensor], Tensor]
    generator: Callable[[Tensor], Tensor]
    d_steps: int = 1
    gp_weight: float = 0.0


def _sp(x: Tensor) -> Tensor:
    return F.softplus(x)


FIXED: dict[str, GANLoss] = {
    # Goodfellow et al. 2014: D maximises log D(x) + log(1 - D(G(z))), G minimises log(1 - D(G(z)))
    "minimax": GANLoss("minimax", lambda r, f: _sp(-r) + _sp(f), lambda f: -_sp(f)),
    # the same paper's non-saturating generator loss, -log D(G(z))
    "non_saturating": GANLoss("non_saturating", lambda r, f: _sp(-r) + _sp(f), lambda f: _sp(-f)),
    # hinge (Lim & Ye 2017; Miyato et al. 2018)
    "hinge": GANLoss("hinge", lambda r, f: F.relu(1 - r) + F.relu(1 + f), lambda f: -f),
    # least squares (Mao et al. 2017), targets a = 0, b = c = 1
    "least_squares": GANLoss(
        "least_squares", lambda r, f: 0.5 * (r - 1) ** 2 + 0.5 * f**2, lambda f: 0.5 * (f - 1) ** 2
    ),
    # WGAN-GP (Gulrajani et al. 2017): critic -D(x) + D(G(z)) + λ (||∇D(x̂)|| - 1)², n_critic 5
    "wgan_gp": GANLoss("wgan_gp", lambda r, f: f - r, lambda f: -f, d_steps=5, gp_weight=10.0),
}


def gradient_penalty(
    disc: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator
) -> Tensor:
    """WGAN-GP's penalty per example, ``(||∇_x̂ D(x̂)||₂ - 1)²`` at x̂ = ε x + (1 - ε) x̃ with
    ε ~ U[0, 1] per example (Gulrajani et al. 2017, Algorithm 1)."""
    eps = torch.rand(real.shape[0], 1, generator=generator, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return (grad.norm(dim=-1) - 1) ** 2


class LearnedGANLoss(nn.Module):
    """A learned GAN loss: each player's objective a weighted sum of the fixed losses' terms,

    D: ``a_1 softplus(-r) + a_2 relu(1 - r) + a_3 (r - 1)²/2 + b_1 softplus(f) + b_2 relu(1 + f)
    + b_3 f²/2``;  G: ``c_1 softplus(-f) - c_2 f + c_3 (f - 1)²/2``,

    nine named weights starting at the non-saturating GAN (a_1 = b_1 = c_1 = 1, the rest 0):
    the family holds the non-saturating, hinge and least-squares losses and every mixture of
    them, so a search starts at a known loss and moves by evidence (small enough for CMA-ES)."""

    d_steps = 1
    gp_weight = 0.0
    name = "learned"

    def __init__(self) -> None:
        super().__init__()
        self.d_real = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.d_fake = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.g_fake = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    def discriminator(self, r: Tensor, f: Tensor) -> Tensor:
        real = torch.stack([_sp(-r), F.relu(1 - r), 0.5 * (r - 1) ** 2], -1)
        fake = torch.stack([_sp(f), F.relu(1 + f), 0.5 * f**2], -1)
        return real @ self.d_real + fake @ self.d_fake

    def generator(self, f: Tensor) -> Tensor:
        return torch.stack([_sp(-f), -f, 0.5 * (f - 1) ** 2], -1) @ self.g_fake

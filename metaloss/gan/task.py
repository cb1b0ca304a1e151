"""GANs as tasks of kind ``gan``, on the ring of 8 Gaussians (``task=gan_ring``) or MNIST-1D
(``task=gan_mnist1d``): ``metaloss-train task=gan_ring loss=gan_hinge`` trains a generator and a
discriminator with a GAN loss; ``metaloss-meta task=gan_ring loss=learned_gan optim=adam
meta_optim=cmaes`` searches a learned one (docs/gan.md). The task holds the training budget (its
config's values); the two players' Adam optimizers are its own
(:func:`metaloss.gan.train.train_gan`), at the run's ``optim.lr``."""

from __future__ import annotations

from typing import Any

from metaloss import kinds
from metaloss.gan.train import Budget, search, train_gan
from metaloss.tasks.own_loop import OwnLoopTask

MEASURES = kinds.GAN.metrics  # one list of the measures: the kind's


class GAN(OwnLoopTask):
    """``steps`` generator updates on batches of ``batch`` (``z_dim`` noise dimensions, players
    of ``hidden`` units), measured on ``samples`` generated points of ``data`` (``ring`` or
    ``mnist1d``: :data:`metaloss.gan.train.DATA`; :class:`metaloss.gan.train.Budget`)."""

    kind = "gan"
    primary_metric = "test/frechet"
    search_fn = search  # CMA-ES on the validation Fréchet distance

    def __init__(
        self,
        steps: int = 1500,
        batch: int = 128,
        z_dim: int = 16,
        hidden: int = 64,
        samples: int = 2500,
        data: str = "ring",
    ) -> None:
        self.budget = Budget(
            steps=steps, batch=batch, z_dim=z_dim, hidden=hidden, samples=samples, data=data
        )
        self.name = f"gan_{data}"

    def debug_sized(self, **keep: Any) -> GAN:
        """The same task in seconds (``debug=default``): a few steps of tiny players; ``keep``:
        settings that stay as given."""
        b = self.budget
        small = dict(steps=5, batch=16, z_dim=b.z_dim, hidden=8, samples=64, data=b.data)
        return GAN(**{**small, **keep})

    def describe(self) -> str:
        b = self.budget
        return f"{self.name} ({b.steps} generator steps of batch {b.batch}, {b.hidden} units)"

    def train(self, loss: Any, *, lr: float, seed: int) -> dict[str, float]:
        """One training run: its test measures and their validation twins (other noise)."""
        m = train_gan(loss, self.budget, lr=lr, seed=seed)
        return {
            f"{split}/{k}": m[pre + k]
            for split, pre in (("test", ""), ("val", "val_"))
            for k in MEASURES
        }

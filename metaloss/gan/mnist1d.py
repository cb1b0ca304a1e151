"""MNIST-1D (Greydanus, "Scaling down deep learning", 2020) as a GAN's data: 40-number signals
of ten digit classes, generated locally (:func:`metaloss.tasks.classification.mnist1d`: 3500
training, 500 validation and 1000 test signals).

The measures read a classifier trained once on the real training signals (an MLP 40-128-128-10,
fixed seed), as the Fréchet Inception Distance of Heusel et al. (2017) reads Inception-v3: the
Fréchet distance between its penultimate features of generated and of real signals (``frechet``;
test or validation signals, drawn with replacement), the classes it finds among the generated
signals (``modes``: classes given at least 2% of them, of 10), and the fraction of generated
signals that lie on the real signals' manifold in that feature space (``high_quality``: the
improved precision of Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing
Generative Models", NeurIPS 2019 — within the distance from some real signal to its k-th
nearest real neighbour, k = 3). The classifier's confidence is no such measure: it is above
0.5 on 97% of Gaussian noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaloss.gan.frechet import frechet_distance
from metaloss.runtime import one_thread

CLASSES = 10
CLASSIFIER_STEPS, CLASSIFIER_LR, CLASSIFIER_BATCH = 3000, 1e-3, 128
MODE_SHARE, K_NEAREST = 0.02, 3


class Mnist1dData:
    """MNIST-1D's signals and the feature classifier its measures read (built in seconds)."""

    name, dim = "mnist1d", 40

    def __init__(self) -> None:
        from metaloss.tasks.classification import mnist1d

        task = mnist1d(seed=0)
        self.x = {"train": task.x_train, "val": task.x_val, "test": task.x_test}
        with one_thread():  # the same classifier whatever the run's threads (and faster)
            self.features, self.head = _classifier(task.x_train, task.y_train)
        with torch.no_grad():
            pred = self.head(self.features(task.x_test)).argmax(-1)
        self.classifier_test_acc = float((pred == task.y_test).float().mean())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self._draw("train", n, generator)

    def reference(self, n: int, generator: torch.Generator, split: str) -> Tensor:
        return self._draw(split, n, generator)

    def _draw(self, split: str, n: int, generator: torch.Generator) -> Tensor:
        x = self.x[split]
        return x[torch.randint(0, len(x), (n,), generator=generator)]

    def measures(self, points: Tensor, real: Tensor) -> dict[str, float]:
        if not torch.isfinite(points).all():
            return {"modes": float("nan"), "high_quality": float("nan"), "frechet": float("nan")}
        with torch.no_grad():
            feats, real_feats = self.features(points), self.features(real)
            pred = self.head(feats).argmax(-1)
            share = torch.bincount(pred, minlength=CLASSES).float() / len(points)
            return {
                "modes": float((share >= MODE_SHARE).sum()),
                "high_quality": precision(feats, real_feats, K_NEAREST),
                "frechet": frechet_distance(feats, real_feats),
            }


def precision(fake: Tensor, real: Tensor, k: int) -> float:
    """The fraction of ``fake`` within the k-NN ball of some ``real`` point (the ball's radius:
    that point's distance to its k-th nearest other real point; Kynkäänniemi et al. 2019)."""
    radius = torch.cdist(real, real).kthvalue(k + 1, dim=-1).values  # k + 1: itself at 0
    return float((torch.cdist(fake, real) <= radius).any(-1).float().mean())


def _classifier(x: Tensor, y: Tensor) -> tuple[nn.Module, nn.Module]:
    """An MLP trained with Adam on (x, y) from a fixed seed: (features, head)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        features = nn.Sequential(
            nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()
        )
        head = nn.Linear(128, CLASSES)
    opt = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=CLASSIFIER_LR)
    g = torch.Generator().manual_seed(0)
    for _ in range(CLASSIFIER_STEPS):
        idx = torch.randint(0, len(x), (CLASSIFIER_BATCH,), generator=g)
        loss = nn.functional.cross_entropy(head(features(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    features.requires_grad_(False)
    head.requires_grad_(False)
    return features.eval(), head.eval()

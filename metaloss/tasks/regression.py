"""Regression tasks: ML3's sine family, a regression with gross training outliers, diabetes."""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_diabetes

from metaloss.tasks.base import Task, standardize, three_way_split


def sine(
    *,
    seed: int = 0,
    amplitude=(0.1, 5.0),
    phase=(0.0, math.pi),
    x_range=(-5.0, 5.0),
    n_train: int = 100,
    n_val: int = 100,
    n_test: int = 100,
    noise: float = 0.0,
) -> Task:
    """One task from ML3's sine family (Bechtle et al. 2021; Finn et al. 2017):
    y = A sin(x - φ) with A ~ U(amplitude), φ ~ U(phase), x ~ U(x_range).

    ``seed`` picks the task: the same seed gives the same A, φ and points.
    """
    g = torch.Generator().manual_seed(seed)
    a = amplitude[0] + (amplitude[1] - amplitude[0]) * torch.rand((), generator=g)
    ph = phase[0] + (phase[1] - phase[0]) * torch.rand((), generator=g)

    def draw(n):
        x = x_range[0] + (x_range[1] - x_range[0]) * torch.rand(n, 1, generator=g)
        y = a * torch.sin(x - ph) + noise * torch.randn(n, 1, generator=g)
        return x, y

    (xtr, ytr), (xva, yva), (xte, yte) = draw(n_train), draw(n_val), draw(n_test)
    return Task(
        "sine",
        "regression",
        xtr,
        ytr,
        xva,
        yva,
        xte,
        yte,
        distribution=True,
        info={"amplitude": float(a), "phase": float(ph)},
    )


def outliers(
    *,
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 200,
    n_test: int = 1000,
    fraction: float = 0.2,
    magnitude: float = 10.0,
    noise: float = 0.3,
    corrupt_val: bool = False,
) -> Task:
    """y = 2 sin(x) + 0.5 x + noise on x ~ U(-3, 3), with a ``fraction`` of the *training*
    targets pushed up by a gross one-sided error in [magnitude, 2 magnitude].

    The test split is clean; the validation split is clean unless ``corrupt_val``.
    This is the case where MSE is dragged towards the outliers and MAE/Huber are not.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outliers.fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)

    def draw(n, corrupt):
        x = -3.0 + 6.0 * torch.rand(n, 1, generator=g)
        y = 2.0 * torch.sin(x) + 0.5 * x + noise * torch.randn(n, 1, generator=g)
        if corrupt:
            hit = torch.rand(n, 1, generator=g) < fraction
            y = y + hit * magnitude * (1.0 + torch.rand(n, 1, generator=g))
        return x, y

    (xtr, ytr), (xva, yva), (xte, yte) = (
        draw(n_train, True),
        draw(n_val, corrupt_val),
        draw(n_test, False),
    )
    return Task(
        "outliers",
        "regression",
        xtr,
        ytr,
        xva,
        yva,
        xte,
        yte,
        info={"fraction": fraction, "magnitude": magnitude},
    )


def diabetes(*, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.2) -> Task:
    """scikit-learn's bundled diabetes regression (442 patients, 10 features); inputs and
    target standardised with training-split statistics."""
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)[:, None]
    (xtr, ytr), (xva, yva), (xte, yte) = three_way_split(
        x, y, val_frac=val_frac, test_frac=test_frac, seed=seed
    )
    xtr, xva, xte = standardize(xtr, xva, xte)
    ytr, yva, yte = standardize(ytr, yva, yte)
    return Task("diabetes", "regression", xtr, ytr, xva, yva, xte, yte)

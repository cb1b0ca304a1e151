"""Classification tasks on bundled or locally generated data (no network)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sklearn.datasets import load_breast_cancer, load_digits

from metaloss.tasks.base import (
    Task,
    finish_classification,
    permutation,
    standardize,
    three_way_split,
)


def digits(
    *,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.25,
    label_noise=None,
    imbalance_ratio=None,
    imbalance_profile: str = "rank",
) -> Task:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), as [1, 8, 8] in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    splits = three_way_split(x, y, val_frac=val_frac, test_frac=test_frac, seed=seed)
    return finish_classification(
        "digits",
        "classification",
        *splits,
        num_classes=10,
        seed=seed,
        label_noise_cfg=label_noise,
        imbalance_ratio=imbalance_ratio,
        imbalance_profile=imbalance_profile,
    )


def breast_cancer(
    *,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.25,
    label_noise=None,
    imbalance_ratio=None,
    imbalance_profile: str = "rank",
) -> Task:
    """scikit-learn's Wisconsin breast cancer (569 cases, 30 features), binary:
    1 = malignant (the minority class)."""
    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(1 - y)  # sklearn codes malignant as 0; make the minority the positive class
    (xtr, ytr), (xva, yva), (xte, yte) = three_way_split(
        x, y, val_frac=val_frac, test_frac=test_frac, seed=seed
    )
    xtr, xva, xte = standardize(xtr, xva, xte)
    return finish_classification(
        "breast_cancer",
        "binary",
        (xtr, ytr),
        (xva, yva),
        (xte, yte),
        num_classes=2,
        seed=seed,
        label_noise_cfg=label_noise,
        imbalance_ratio=imbalance_ratio,
        imbalance_profile=imbalance_profile,
    )


def mnist1d(
    *,
    seed: int = 0,
    n_val: int = 500,
    num_samples: int = 5000,
    data_seed: int = 42,
    positive_classes: Sequence[int] | None = None,
    label_noise=None,
    imbalance_ratio=None,
    imbalance_profile: str = "rank",
) -> Task:
    """MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package, never
    downloaded: 4000 train / 1000 test at the default 5000 samples, with ``n_val``
    carved from train by ``seed``. ``positive_classes`` turns it into a binary task
    (those digits vs the rest)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, data_seed
    data = make_dataset(args)
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
    xte, yte = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
    kind, c = "classification", 10
    if positive_classes is not None:
        pos = torch.tensor(list(positive_classes))
        y, yte = torch.isin(y, pos).long(), torch.isin(yte, pos).long()
        kind, c = "binary", 2
    idx = permutation(len(x), seed)
    va, tr = idx[:n_val], idx[n_val:]
    return finish_classification(
        "mnist1d",
        kind,
        (x[tr], y[tr]),
        (x[va], y[va]),
        (xte, yte),
        num_classes=c,
        seed=seed,
        label_noise_cfg=label_noise,
        imbalance_ratio=imbalance_ratio,
        imbalance_profile=imbalance_profile,
        info={
            "positive_classes": None
            if positive_classes is None
            else [int(c) for c in positive_classes]
        },
    )

"""Embedding tasks (metric learning): learn an embedding in which examples of one class lie
close, then retrieve among classes the training split never saw.

The field's protocol (e.g. CUB-200 and Cars-196 in Musgrave et al., "A Metric Learning Reality
Check", ECCV 2020): the classes themselves are split, so the validation and test splits hold
*held-out classes*, and a model is scored by retrieval within a split (Recall@1, MAP@R; see
:func:`metaloss.kinds.score_embedding`), not by classifying. There is no image data set
offline, so the classes are procedural MNIST-1D classes (:func:`metaloss.tasks.episodes.
procedural_classes`: random templates pushed through MNIST-1D's transformations), made once
from ``data_seed``.

Draws: the test classes are the same for every ``seed``; ``seed`` re-splits the other classes
into training and validation classes (as :func:`metaloss.tasks.base.three_way_split` does
with examples), so a fresh draw never tests on a class another draw trained or validated on.
Inputs are standardised with the training split's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaloss.tasks.base import TEST_SPLIT_SEED, Task, permutation, standardize
from metaloss.tasks.episodes import procedural_classes


def embedding_mnist1d(
    *,
    seed: int = 0,
    classes: Sequence[int] = (32, 16, 16),
    per_class: int = 40,
    embed_dim: int = 32,
    data_seed: int = 0,
) -> Task:
    """An embedding task over procedural MNIST-1D classes (module docstring): ``classes`` =
    the numbers of training / validation / test classes, ``per_class`` examples each;
    ``embed_dim`` is the model's output size. Training labels are 0..C_train-1; the held-out
    splits keep labels of their own (C_train..), so no label is shared across splits."""
    sizes = [int(c) for c in classes]
    if len(sizes) != 3 or min(sizes) < 2:
        raise ValueError(f"task.classes = {list(classes)}: three class counts, each >= 2")
    if not isinstance(per_class, int) or per_class < 2:
        raise ValueError(f"task.per_class = {per_class!r}: must be an integer >= 2")
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"task.embed_dim = {embed_dim!r}: must be an integer >= 1")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"task.seed = {seed!r}: must be an integer >= 0")
    n_train, n_val, n_test = sizes
    total = sum(sizes)
    by_class, digest = procedural_classes(total, per_class, data_seed)
    order = permutation(total, TEST_SPLIT_SEED)
    test_cls, rest = order[:n_test], order[n_test:]
    if seed != TEST_SPLIT_SEED:
        rest = rest[permutation(len(rest), seed)]
    train_cls, val_cls = rest[:n_train], rest[n_train : n_train + n_val]

    def split(cls: torch.Tensor, first_label: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = by_class[cls].reshape(-1, by_class.shape[-1])
        y = (torch.arange(len(cls)) + first_label).repeat_interleave(per_class)
        return x, y

    (xtr, ytr), (xva, yva), (xte, yte) = (
        split(train_cls, 0),
        split(val_cls, n_train),
        split(test_cls, n_train + n_val),
    )
    xtr, xva, xte = standardize(xtr, xva, xte)
    info = {
        "embed_dim": embed_dim,
        "classes": sizes,
        "per_class": per_class,
        "data_seed": data_seed,
        "sha256": digest,
        "test_classes": sorted(test_cls.tolist()),
    }
    return Task(
        "embedding_mnist1d",
        "embedding",
        xtr,
        ytr,
        xva,
        yva,
        xte,
        yte,
        num_classes=n_train,
        info=info,
    )

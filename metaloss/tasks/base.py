"""A task: seeded train / val / test splits and the kind of problem they pose."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaloss import kinds


@dataclass
class Task:
    """Data for one learning problem, split three ways (CPU tensors until :meth:`to`).

    ``kind`` is one of ``regression``, ``classification``, ``binary``, ``segmentation``.
    ``distribution`` is True for task *families* (sine): instantiating the same config
    with another ``seed`` draws a different task from the family.
    """

    name: str
    kind: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int | None = None
    distribution: bool = False
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds.get(self.kind)  # a registered kind (metaloss.kinds), else ValueError
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(
                    f"task {self.name}: {split} split has {len(x)} inputs, {len(y)} targets"
                )
            self._check_targets(split, y)

    def _check_targets(self, split: str, y: Tensor) -> None:
        check = kinds.get(self.kind).check_targets
        if check is not None:
            check(self, split, y)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def out_dim(self) -> int:
        return kinds.get(self.kind).out_dim(self)

    @property
    def class_counts(self) -> Tensor | None:
        """Per-class counts in the training split (kinds whose targets are class indices)."""
        if not kinds.get(self.kind).class_indices:
            return None
        return torch.bincount(self.y_train.long(), minlength=self.num_classes or 2)

    @property
    def primary_metric(self) -> str:
        return f"test/{kinds.get(self.kind).primary}"

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Task:
        """The same task with its tensors on ``device``; inputs (and float targets, i.e.
        regression values and masks) cast to ``dtype``. Class labels stay integers."""

        def move(t: Tensor) -> Tensor:
            return t.to(
                device=device,
                dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype,
            )

        return dataclasses.replace(
            self,
            x_train=move(self.x_train),
            x_val=move(self.x_val),
            x_test=move(self.x_test),
            y_train=move(self.y_train),
            y_val=move(self.y_val),
            y_test=move(self.y_test),
        )

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def describe(self) -> str:
        sizes = "/".join(str(len(self.split(s)[0])) for s in ("train", "val", "test"))
        extra = f", {self.num_classes} classes" if self.num_classes else ""
        return f"{self.name} ({self.kind}{extra}; train/val/test {sizes}; x {list(self.in_shape)})"


# Task seeds come in disjoint streams: meta-training and tuning draw ``task.seed ..``
# (``meta.train_tasks`` of them for a family), the meta-test ``TEST_TASK_SEEDS ..`` (checked:
# metaloss.validate), so no test draw is ever a training draw.
TEST_TASK_SEEDS = 10_000
DRAW_STRIDE = 3  # a single data set's draw seeds split, imbalance and noise with seed, +1, +2


def meta_test_draws(seeds: int, per_seed: int, stride: int = DRAW_STRIDE) -> range:
    """The task seeds a meta-test of ``seeds`` seeds draws: seed s takes
    ``TEST_TASK_SEEDS + stride * (s * per_seed + i)`` for i < ``per_seed`` (every seed such a
    draw uses lies in the range returned)."""
    return range(TEST_TASK_SEEDS, TEST_TASK_SEEDS + stride * int(seeds) * int(per_seed))


def permutation(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


TEST_SPLIT_SEED = 0


def three_way_split(x: Tensor, y: Tensor, *, val_frac: float, test_frac: float, seed: int):
    """(train, val, test) of a finite data set. The test examples are the same for every
    ``seed`` (drawn with ``TEST_SPLIT_SEED``); ``seed`` re-splits the rest into train and val.
    So a fresh draw (another seed) is a new train/val split that never tests on an example
    another draw trained or validated on. Seed 0 is the split metaloss always made."""
    idx = permutation(len(x), TEST_SPLIT_SEED)
    n_test = round(len(x) * test_frac)
    n_val = round(len(x) * val_frac)
    te, rest = idx[:n_test], idx[n_test:]
    if seed != TEST_SPLIT_SEED:
        rest = rest[permutation(len(rest), seed)]
    va, tr = rest[:n_val], rest[n_val:]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale by training-split statistics only (no test leakage)."""
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-8)
    return [(t - mu) / sd for t in (train, *others)]


IMBALANCE_PROFILES = ("index", "rank")


def imbalance(
    x: Tensor,
    y: Tensor,
    *,
    ratio: float,
    num_classes: int,
    seed: int,
    binary: bool,
    profile: str = "rank",
) -> tuple[Tensor, Tensor]:
    """Subsample the training split to a long-tailed class profile.

    Binary: keep every majority example and ``n_major / ratio`` minority ones. Multi-class:
    class c keeps ``n_max * ratio^(-r_c / (C-1))`` examples (exponential profile, Cui et al.
    2019), so the head:tail ratio is ``ratio``. ``profile="rank"`` (the default, what the
    recorded experiments used): r_c is c's rank by frequency in the drawn split, and the
    binary minority is the rarer class (class 1 on a tie) — so which classes are head and
    tail can change from one draw to the next. ``profile="index"``: r_c = c (class 0 the
    head, class C-1 the tail) and the binary minority is class 1, on every draw — the
    convention of Cui et al., and what a loss with per-class parameters needs to mean the same
    class on a fresh draw (``meta_test.fresh_draws`` refuses ``rank`` for that reason).
    """
    if profile not in IMBALANCE_PROFILES:
        raise ValueError(f"imbalance_profile must be one of {IMBALANCE_PROFILES}, got {profile!r}")
    if ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1 (majority:minority), got {ratio}")
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(y.long(), minlength=num_classes)
    if binary:
        major = 0 if profile == "index" or counts[0] == counts[1] else int(torch.argmax(counts))
        keep_n = counts.clone()
        keep_n[1 - major] = max(1, int(counts[major].item() / ratio))
    else:
        order = (
            torch.arange(num_classes)
            if profile == "index"
            else torch.argsort(counts, descending=True, stable=True)
        )
        n_max = counts.max().item()
        keep_n = counts.clone()
        for rank, c in enumerate(order.tolist()):
            keep_n[c] = max(
                1, min(int(counts[c]), int(n_max * ratio ** (-rank / (num_classes - 1))))
            )
    kept: list[Tensor] = []
    for c in range(num_classes):
        members = torch.nonzero(y.long() == c).flatten()
        kept.append(members[torch.randperm(len(members), generator=g)[: int(keep_n[c])]])
    keep = torch.cat(kept).sort().values
    return x[keep], y[keep]


def label_noise(y: Tensor, *, rate: float, kind: str, num_classes: int, seed: int) -> Tensor:
    """Corrupt a fraction ``rate`` of labels: ``symmetric`` (to a uniformly drawn other
    class) or ``pair`` (class c flips to c+1 mod C, Han et al. 2018)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label_noise.rate must be in [0, 1), got {rate}")
    if kind not in ("symmetric", "pair"):
        raise ValueError(f"label_noise.kind must be 'symmetric' or 'pair', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    y = y.clone().long()
    flip = torch.rand(len(y), generator=g) < rate
    if kind == "pair":
        new = (y + 1) % num_classes
    else:
        shift = torch.randint(1, num_classes, (len(y),), generator=g)
        new = (y + shift) % num_classes
    return torch.where(flip, new, y)


def finish_classification(
    name: str,
    kind: str,
    train,
    val,
    test,
    *,
    num_classes: int,
    seed: int,
    label_noise_cfg=None,
    imbalance_ratio=None,
    imbalance_profile: str = "rank",
    info=None,
) -> Task:
    """Apply the training-split-only corruptions shared by every classification task."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    info = dict(info or {})
    if imbalance_ratio:
        xtr, ytr = imbalance(
            xtr,
            ytr,
            ratio=float(imbalance_ratio),
            num_classes=num_classes,
            seed=seed + 1,
            binary=(kind == "binary"),
            profile=imbalance_profile,
        )
        info["imbalance_ratio"] = float(imbalance_ratio)
        info["imbalance_profile"] = imbalance_profile
    if label_noise_cfg and float(label_noise_cfg.get("rate", 0.0)) > 0:
        ytr = label_noise(
            ytr,
            rate=float(label_noise_cfg["rate"]),
            kind=str(label_noise_cfg.get("kind", "symmetric")),
            num_classes=num_classes,
            seed=seed + 2,
        )
        info["label_noise"] = dict(label_noise_cfg)
    return Task(
        name,
        kind,
        xtr,
        ytr.long(),
        xva,
        yva.long(),
        xte,
        yte.long(),
        num_classes=num_classes,
        info=info,
    )

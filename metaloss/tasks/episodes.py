"""Few-shot episodes: N-way K-shot classification over procedurally generated classes, and
sinusoid regression (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.1).

No Omniglot or miniImageNet is available offline, so the classification benchmark makes its own
classes: each class is a new random 12-point template (smoothed Gaussian noise, the size of
MNIST-1D's digit templates) pushed through MNIST-1D's own transformations (Greydanus 2020:
padding, shear, translation, correlated and i.i.d. noise, via ``mnist1d.data.make_dataset``),
``per_class`` examples each. The classes are split once into disjoint meta-train / meta-val /
meta-test pools (64 / 16 / 20 by default, miniImageNet's proportions). An episode draws ``way``
classes of one pool, relabels them 0..way-1 in a random order, and takes ``shot`` support and
``query`` query examples of each; a seed fixes the whole episode stream.

Sinusoid episodes follow the MAML paper: amplitude in [0.1, 5], phase in [0, π], inputs
uniform in [-5, 5]; ``shot`` support and ``query`` query points per episode. The three splits
are disjoint seed streams of the same distribution (as in the paper).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "val", "test")
# Seed streams: split s, meta-batch or evaluation seed n draws from generator(seed*3 + s).
_SPLIT_INDEX = {s: i for i, s in enumerate(SPLITS)}


class EpisodeBatch(NamedTuple):
    """E episodes stacked: support [E, way*shot, ...] and query [E, way*query, ...]."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EpisodeBatch:
        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return EpisodeBatch(*(move(t) for t in self))


def _generator(seed: int, split: str) -> torch.Generator:
    if split not in _SPLIT_INDEX:
        raise ValueError(f"episode split {split!r}: must be one of {list(SPLITS)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"episode seed {seed!r}: must be an integer >= 0")
    return torch.Generator().manual_seed(seed * len(SPLITS) + _SPLIT_INDEX[split])


@dataclass
class ClassEpisodes:
    """N-way K-shot classification episodes over class pools (see the module docstring).

    ``pools[split]``: [C_split, per_class, D] examples of that split's classes."""

    name: str
    pools: dict[str, Tensor]
    way: int
    shot: int
    query: int
    info: dict = field(default_factory=dict)
    kind: str = "classification"

    def __post_init__(self) -> None:
        for split, pool in self.pools.items():
            if self.way > pool.shape[0]:
                raise ValueError(
                    f"episodes.way = {self.way}: the {split} split has only "
                    f"{pool.shape[0]} classes (valid: 2..{pool.shape[0]})"
                )
            if self.shot + self.query > pool.shape[1]:
                raise ValueError(
                    f"episodes.shot + episodes.query = {self.shot + self.query}: each class has "
                    f"{pool.shape[1]} examples (valid: shot + query <= {pool.shape[1]})"
                )

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.pools["train"].shape[2:])

    @property
    def out_dim(self) -> int:
        return self.way

    def sample(self, split: str, n: int, seed: int) -> EpisodeBatch:
        """``n`` episodes of ``split``, fixed by ``seed``."""
        g = _generator(seed, split)
        pool = self.pools[split]
        c, m = pool.shape[:2]
        xs, ys, xq, yq = [], [], [], []
        labels = torch.arange(self.way)
        for _ in range(n):
            classes = torch.randperm(c, generator=g)[: self.way]
            picks = torch.stack(
                [torch.randperm(m, generator=g)[: self.shot + self.query] for _ in classes]
            )  # [way, shot + query]
            x = pool[classes[:, None], picks]  # [way, shot + query, D]
            xs.append(x[:, : self.shot].reshape(-1, *self.in_shape))
            xq.append(x[:, self.shot :].reshape(-1, *self.in_shape))
            ys.append(labels.repeat_interleave(self.shot))
            yq.append(labels.repeat_interleave(self.query))
        return EpisodeBatch(torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq))


def _templates(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random 12-point templates: smoothed Gaussian noise, peak |value| 1 (MNIST-1D's
    digit templates are 12-point sketches of that size)."""
    raw = rng.normal(size=(n, 16))
    kernel = np.array([0.25, 0.5, 0.25])
    smooth = np.stack([np.convolve(r, kernel, mode="valid") for r in raw])[:, 1:13]
    smooth -= smooth.mean(axis=1, keepdims=True)
    return smooth / np.abs(smooth).max(axis=1, keepdims=True)


def procedural_classes(total: int, per_class: int, data_seed: int) -> tuple[Tensor, str]:
    """``total`` procedural MNIST-1D classes (module docstring), ``per_class`` examples each:
    ``[total, per_class, 40]`` raw (unstandardised) signals and the SHA-256 prefix of their
    bytes. Deterministic in ``data_seed``; NumPy's global generator is left as it was."""
    from mnist1d.data import get_dataset_args, get_templates, make_dataset

    rng = np.random.default_rng(data_seed)
    reference = get_templates()
    templates = {"x": _templates(total, rng), "t": reference["t"], "y": np.arange(total)}
    args = get_dataset_args()
    # make_dataset splits off a test part; keep all (train_split=1) and seed its global draws
    args.num_samples, args.seed, args.train_split = total * per_class, data_seed, 1.0
    state = np.random.get_state()  # mnist1d draws from numpy's global generator: restore it
    try:
        data = make_dataset(args, template=templates)
    finally:
        np.random.set_state(state)
    x = torch.tensor(data["x"], dtype=torch.float32)
    y = torch.tensor(data["y"])
    order = torch.argsort(y, stable=True)
    by_class = x[order].reshape(total, per_class, -1)
    return by_class, hashlib.sha256(by_class.numpy().tobytes()).hexdigest()[:16]


def fewshot_mnist1d(
    *,
    way: int = 5,
    shot: int = 1,
    query: int = 15,
    classes: tuple[int, int, int] | list[int] = (64, 16, 20),
    per_class: int = 40,
    data_seed: int = 0,
) -> ClassEpisodes:
    """Procedural MNIST-1D few-shot classes (module docstring): ``classes`` = the sizes of the
    disjoint meta-train / meta-val / meta-test class pools, ``per_class`` examples each, all
    drawn from ``data_seed``. Inputs are standardised with the meta-train pool's statistics."""
    sizes = [int(c) for c in classes]
    if len(sizes) != 3 or min(sizes) < 2:
        raise ValueError(f"episodes.classes = {list(classes)}: three pool sizes, each >= 2")
    if not isinstance(per_class, int) or per_class < 2:
        raise ValueError(f"episodes.per_class = {per_class!r}: must be an integer >= 2")
    by_class, digest = procedural_classes(sum(sizes), per_class, data_seed)
    bounds = np.cumsum([0, *sizes])
    pools = {s: by_class[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    mean, std = pools["train"].mean(), pools["train"].std()
    pools = {s: (p - mean) / std for s, p in pools.items()}
    info = {"classes": sizes, "per_class": per_class, "data_seed": data_seed, "sha256": digest}
    return ClassEpisodes("fewshot_mnist1d", pools, way, shot, query, info)


@dataclass
class SinusoidEpisodes:
    """Sinusoid regression episodes (Finn et al. 2017): y = A sin(x − b), A ∈ [0.1, 5],
    b ∈ [0, π], x ∈ U[-5, 5]; ``shot`` support and ``query`` query points each."""

    shot: int = 10
    query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, float(np.pi))
    name: str = "sinusoid"
    kind: str = "regression"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("shot", "query"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"episodes.{key} = {v!r}: must be an integer >= 1")
        lo, hi = self.amplitude
        if not 0 <= lo <= hi:
            raise ValueError(f"episodes.amplitude = {list(self.amplitude)}: need 0 <= lo <= hi")

    in_shape = (1,)
    out_dim = 1

    def sample(self, split: str, n: int, seed: int) -> EpisodeBatch:
        g = _generator(seed, split)
        a = torch.empty(n, 1, 1).uniform_(*self.amplitude, generator=g)
        b = torch.empty(n, 1, 1).uniform_(*self.phase, generator=g)
        x = torch.empty(n, self.shot + self.query, 1).uniform_(-5.0, 5.0, generator=g)
        y = a * torch.sin(x - b)
        s = self.shot
        return EpisodeBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


def sinusoid(*, shot: int = 10, query: int = 10) -> SinusoidEpisodes:
    """Sinusoid regression episodes (Finn et al. 2017, section 5.1)."""
    return SinusoidEpisodes(shot=shot, query=query)

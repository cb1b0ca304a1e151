"""Task kinds: what a kind's targets are, how a model's outputs on it are scored, and the
defaults every command uses for it — one :class:`TaskKind` per kind, in one registry.

The engine (inner loops, hypergradients, the meta-test) is kind-agnostic: it trains a model
with a loss ``loss(pred, target) -> [B]`` and asks the task's kind for everything else. Five
kinds ship (regression, classification, binary, segmentation, embedding), and two whose tasks
train with a loop of their own (``gan``: two players; ``policy``: an environment). A new one
is a :class:`TaskKind` passed to :func:`register`, with losses that declare it
(``@fits("<kind>")``, ``kinds = ("<kind>",)``): docs/extending.md, "Adding a task kind".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Scorer = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class TaskKind:
    """One task kind.

    ``metrics``: the names :attr:`evaluate` returns, in order (``metaloss.metrics`` prefixes
    them ``test/``, ``val/``); ``primary``: the one a run reports by default (one of
    ``metrics``); ``evaluate(out, y, *, num_classes, class_counts) -> {name: value}``: the
    metrics of model outputs ``out`` on targets ``y`` (finite outputs: a non-finite output is
    scored NaN before it gets here); ``check_targets(task, split, y)``: raise ``ValueError``
    for targets that do not fit the kind (``None``: any); ``out_dim(task)``: the model's output
    size per example; ``class_indices``: targets are class indices (the task has class counts,
    and a loss's probe prediction has ``out_dim`` columns) — else targets are shaped like the
    predictions; ``default_loss``: ``metaloss-train`` without ``loss=`` and the validation
    objective of meta-training without ``meta.objective``; ``baselines``: the meta-test's
    ``compare:`` when none is given; ``search_objective``: the true-metric objective CMA-ES
    uses by default (``None``: the run's own objective); ``own_loop``: the task trains with a
    loop of its own (two players, an environment: :mod:`metaloss.gan`, :mod:`metaloss.rl`),
    whose tasks have ``train(loss, lr=, seed=)`` and ``search(...)``; ``evaluate`` and
    ``out_dim`` are then never called."""

    name: str
    metrics: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    primary: str
    evaluate: Scorer
    out_dim: Callable[[Any], int]
    default_loss: str
    baselines: tuple[str, ...]
    class_indices: bool = False
    check_targets: Callable[[Any, str, Tensor], None] | None = None
    search_objective: str | None = None
    own_loop: bool = False

    def __post_init__(self) -> None:
        if len(self.higher_is_better) != len(self.metrics):
            raise ValueError(f"task kind {self.name}: one higher_is_better per metric")
        if self.primary not in self.metrics:
            raise ValueError(
                f"task kind {self.name}: primary {self.primary!r} not in {self.metrics}"
            )


KINDS: dict[str, TaskKind] = {}
# whether a larger value of a metric is better: every registered kind's, and the training loss
HIGHER_IS_BETTER: dict[str, bool] = {}


def register(kind: TaskKind) -> TaskKind:
    """Make ``kind`` known to every part of metaloss (tasks, losses, metrics, defaults).
    Registering a name twice is refused unless it is the same kind."""
    if KINDS.get(kind.name, kind) != kind:
        raise ValueError(f"task kind {kind.name!r} is registered already, differently")
    directions = dict(zip(kind.metrics, kind.higher_is_better))
    clash = [m for m, h in directions.items() if HIGHER_IS_BETTER.get(m, h) != h]
    if clash:
        raise ValueError(
            f"task kind {kind.name}: {clash} are metrics of other kinds with the other direction"
        )
    KINDS[kind.name] = kind
    HIGHER_IS_BETTER.update(directions)
    return kind


def get(name: str) -> TaskKind:
    if name not in KINDS:
        raise ValueError(f"unknown task kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


class ByKind(Mapping[str, Any]):
    """A read-only view ``{kind name: one field of its TaskKind}`` that follows the registry."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __getitem__(self, name: str) -> Any:
        if name not in KINDS:
            raise KeyError(name)
        return getattr(KINDS[name], self.field)

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


# ----------------------------------------------------------------------- the scorers


def recall_per_class(pred: Tensor, y: Tensor, c: int) -> Tensor:
    rec = torch.zeros(c)
    for k in range(c):
        m = y == k
        rec[k] = (pred[m] == k).float().mean() if m.any() else float("nan")
    return rec


def macro_f1(pred: Tensor, y: Tensor, c: int) -> float:
    f1 = []
    for k in range(c):
        tp = ((pred == k) & (y == k)).sum().item()
        fp = ((pred == k) & (y != k)).sum().item()
        fn = ((pred != k) & (y == k)).sum().item()
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(f1) / len(f1))


def score_regression(out: Tensor, y: Tensor, **_: Any) -> dict[str, float]:
    r = out.reshape(y.shape) - y
    return {"mse": (r**2).mean().item(), "mae": r.abs().mean().item()}


def _class_scores(pred: Tensor, y: Tensor, c: int) -> tuple[dict[str, float], Tensor]:
    y = y.long().reshape(-1)
    rec = recall_per_class(pred, y, c)
    m = {
        "acc": (pred == y).float().mean().item(),
        "balanced_acc": float(rec[~rec.isnan()].mean()),
        "macro_f1": macro_f1(pred, y, c),
    }
    return m, rec


def score_classification(
    out: Tensor, y: Tensor, *, num_classes: int | None = None, **_: Any
) -> dict[str, float]:
    return _class_scores(out.argmax(-1), y, num_classes or out.shape[-1])[0]


def score_binary(
    out: Tensor, y: Tensor, *, class_counts: Tensor | None = None, **_: Any
) -> dict[str, float]:
    """classification's metrics plus minority_recall: the recall of the rarer class in the
    training split (class 1 if no counts)."""
    m, rec = _class_scores((out.reshape(-1) > 0).long(), y, 2)
    minority = int(torch.argmin(class_counts)) if class_counts is not None else 1
    m["minority_recall"] = float(rec[minority])
    return m


def score_segmentation(out: Tensor, y: Tensor, **_: Any) -> dict[str, float]:
    """Per-image dice and iou of the thresholded mask."""
    p = (out.reshape(out.shape[0], -1) > 0).float()
    t = y.reshape(p.shape).float()
    tp, fp, fn = (p * t).sum(1), (p * (1 - t)).sum(1), ((1 - p) * t).sum(1)
    empty = (tp + fp + fn) == 0  # nothing predicted, nothing there: a perfect image
    dice = torch.where(empty, 1.0, 2 * tp / (2 * tp + fp + fn).clamp_min(1))
    iou = torch.where(empty, 1.0, tp / (tp + fp + fn).clamp_min(1))
    return {"dice": dice.mean().item(), "iou": iou.mean().item()}


def score_embedding(out: Tensor, y: Tensor, **_: Any) -> dict[str, float]:
    """Retrieval within the split, each example a query against all the others (itself
    excluded), by cosine similarity of the embeddings ``out`` ``[N, D]``: Recall@1 (the
    fraction whose nearest neighbour shares its class; pytorch-metric-learning's
    ``precision_at_1``) and MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV
    2020). Computed with pytorch-metric-learning's ``AccuracyCalculator``, the library the
    field reports these with (a torch k-NN: no faiss needed)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    acc = calc.get_accuracy(out.reshape(out.shape[0], -1), y.reshape(-1).long())
    return {
        "recall_at_1": float(acc["precision_at_1"]),
        "map_at_r": float(acc["mean_average_precision_at_r"]),
    }


# --------------------------------------------------------------------- target checks


def check_class_indices(task: Any, split: str, y: Tensor) -> None:
    """Labels are checked once, where data enters: a class index out of range would otherwise
    give a silently wrong loss (a one-hot row of zeros), not an error."""
    n = 2 if task.kind == "binary" else task.num_classes
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(
            f"task {task.name}: {split} labels must be integer class indices, got {y.dtype}"
        )
    if n is None or (len(y) and (int(y.min()) < 0 or int(y.max()) >= n)):
        raise ValueError(
            f"task {task.name}: {split} labels must lie in [0, {n}) "
            f"(num_classes={task.num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )


def check_class_labels(task: Any, split: str, y: Tensor) -> None:
    """Embedding tasks: integer class labels >= 0, one per example. The held-out splits hold
    classes the training split never saw, so they are not checked against ``num_classes``."""
    if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(
            f"task {task.name}: {split} labels must be a 1-D integer tensor, got {y.dtype} "
            f"{list(y.shape)}"
        )
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"task {task.name}: {split} labels must be >= 0, got {int(y.min())}")


def check_binary_mask(task: Any, split: str, y: Tensor) -> None:
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"task {task.name}: {split} masks must hold only 0 and 1")


def _num_classes(task: Any) -> int:
    assert task.num_classes is not None  # Task refuses a classification task without it
    return int(task.num_classes)


REGRESSION = register(
    TaskKind(
        "regression",
        metrics=("mse", "mae"),
        higher_is_better=(False, False),
        primary="mse",
        evaluate=score_regression,
        out_dim=lambda task: int(task.y_train.shape[1]),
        default_loss="mse",
        baselines=("mse", "mae", "huber"),
    )
)
CLASSIFICATION = register(
    TaskKind(
        "classification",
        metrics=("acc", "balanced_acc", "macro_f1"),
        higher_is_better=(True, True, True),
        primary="acc",
        evaluate=score_classification,
        out_dim=_num_classes,
        default_loss="ce",
        baselines=("ce", "focal", "label_smoothing", "poly1"),
        class_indices=True,
        check_targets=check_class_indices,
        search_objective="error",
    )
)
BINARY = register(
    TaskKind(
        "binary",
        metrics=("acc", "balanced_acc", "macro_f1", "minority_recall"),
        higher_is_better=(True, True, True, True),
        primary="balanced_acc",
        evaluate=score_binary,
        out_dim=lambda task: 1,  # one logit
        default_loss="ce",
        baselines=("ce", "weighted_ce", "focal"),
        class_indices=True,
        check_targets=check_class_indices,
        search_objective="error",
    )
)
SEGMENTATION = register(
    TaskKind(
        "segmentation",
        metrics=("dice", "iou"),
        higher_is_better=(True, True),
        primary="dice",
        evaluate=score_segmentation,
        out_dim=lambda task: 1,  # one logit per pixel
        default_loss="dice",
        baselines=("dice", "iou", "bce_dice"),
        check_targets=check_binary_mask,
        search_objective="iou_loss",
    )
)
EMBEDDING = register(
    TaskKind(
        "embedding",
        metrics=("recall_at_1", "map_at_r"),
        higher_is_better=(True, True),
        primary="recall_at_1",
        evaluate=score_embedding,
        out_dim=lambda task: int(task.info["embed_dim"]),
        default_loss="multi_similarity",
        baselines=("contrastive", "triplet", "multi_similarity", "prototype"),
        class_indices=True,
        check_targets=check_class_labels,
        search_objective="recall_error",
    )
)


def _own_loop(name: str) -> Callable[..., Any]:
    def refuse(*_: Any, **__: Any) -> Any:
        raise TypeError(
            f"{name} tasks train with a loop of their own and score themselves (task.train); "
            "a model's outputs on them are never scored here"
        )

    return refuse


# The families with loops of their own: their tasks train and measure themselves
# (metaloss.gan.task, metaloss.rl.task); registered here so their losses can declare the kind
# and the shared statistics (metaloss.metatest.significance) rank their measures the right way.
GAN = register(
    TaskKind(
        "gan",
        metrics=("frechet", "modes", "high_quality"),
        higher_is_better=(False, True, True),
        primary="frechet",
        evaluate=_own_loop("gan"),
        out_dim=_own_loop("gan"),
        default_loss="gan_non_saturating",
        baselines=(
            "gan_minimax",
            "gan_non_saturating",
            "gan_hinge",
            "gan_least_squares",
            "gan_wgan_gp",
        ),
        own_loop=True,
    )
)
POLICY = register(
    TaskKind(
        "policy",
        metrics=("return",),
        higher_is_better=(True,),
        primary="return",
        evaluate=_own_loop("policy"),
        out_dim=_own_loop("policy"),
        default_loss="reinforce",
        baselines=("reinforce",),
        own_loop=True,
    )
)
HIGHER_IS_BETTER["loss"] = (
    False  # the training loss (train/loss), after the built-in kinds' metrics
)

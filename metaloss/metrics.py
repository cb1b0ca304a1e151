"""Evaluation metrics per task kind, as namespaced dicts (``{prefix}/acc`` ...)."""

from __future__ import annotations

import torch
from torch import Tensor

from metaloss import kinds

# The metric names ``evaluate`` returns per task kind, in order: a view of the kinds registry
# (metaloss.kinds), the one source of truth. ``metric_names`` derives expected keys from it,
# so a consumer (the meta-test) never has to learn the keys from whichever runs succeeded.
METRICS_BY_KIND = kinds.ByKind("metrics")


def metric_names(kind: str, prefix: str = "test") -> list[str]:
    """The keys ``evaluate(kind, ..., prefix=prefix)`` returns, e.g.
    ``["test/mse", "test/mae"]``."""
    return [f"{prefix}/{m}" for m in kinds.get(kind).metrics]


def train_result_names(kind: str) -> list[str]:
    """The keys `metaloss.train.train_model` returns: final train loss, then val and test
    metrics."""
    return ["train/loss", *metric_names(kind, "val"), *metric_names(kind, "test")]


@torch.no_grad()
def evaluate(
    kind: str,
    out: Tensor,
    y: Tensor,
    *,
    num_classes: int | None = None,
    class_counts: Tensor | None = None,
    prefix: str = "test",
) -> dict[str, float]:
    """Metrics that fit the task kind, from model outputs ``out`` and targets ``y``: the
    kind's own scorer (:class:`metaloss.kinds.TaskKind`), NaN for every metric of a model
    whose outputs are not finite.

    regression: mse, mae. classification: acc, balanced_acc, macro_f1. binary: the same
    plus minority_recall (recall of the rarer class in the training split, class 1 if no
    counts). segmentation: per-image dice and iou of the thresholded mask.
    """
    spec = kinds.get(kind)
    out = out.detach().float().cpu()
    y = y.detach().cpu()
    if not torch.isfinite(out).all():  # argmax of NaN logits picks a class: a diverged model
        return {f"{prefix}/{k}": float("nan") for k in spec.metrics}  # would score like a guess
    m = spec.evaluate(out, y, num_classes=num_classes, class_counts=class_counts)
    if tuple(m) != spec.metrics:
        raise ValueError(f"task kind {kind}: evaluate returned {tuple(m)}, not {spec.metrics}")
    return {f"{prefix}/{k}": v for k, v in m.items()}


def nan_where_diverged(pred: Tensor, value: Tensor) -> Tensor:
    """``value`` (per example ``[N]``, or one per task ``[]``), NaN where the prediction is not
    finite. The true metrics threshold or argmax the predictions, and ``argmax`` of NaN logits
    still names a class: without this a diverged model would score like a guess (and, on a
    balanced metric, could beat a trained one). vmap-safe (no data-dependent control flow)."""
    ok = torch.isfinite(pred.reshape(pred.shape[0], -1)).all(-1)
    if value.ndim == 0:
        ok = ok.all()
    return torch.where(ok, value, torch.full_like(value, float("nan")))


def zero_one_error(pred: Tensor, target: Tensor, **_) -> Tensor:
    """Per-example 0-1 classification error (1 - correct): a validation objective for
    derivative-free hypergradients (``hypergrad=es hypergrad.objective=error``); NaN for a
    non-finite prediction (:func:`nan_where_diverged`)."""
    if pred.ndim == 1 or pred.shape[-1] == 1:
        guess = (pred.reshape(pred.shape[0]) > 0).long()
    else:
        guess = pred.argmax(-1)
    return nan_where_diverged(pred, (guess != target.reshape(guess.shape).long()).to(pred.dtype))


def recall_error(pred: Tensor, target: Tensor, **_) -> Tensor:
    """Per-example retrieval error of embeddings ``pred`` ``[N, D]``: 1 where the nearest
    other example by cosine similarity has another class (so the mean is 1 - Recall@1, as
    :func:`metaloss.kinds.score_embedding` computes it); NaN for a non-finite embedding.
    vmap-safe: a true-metric objective for CMA-ES on embedding tasks. A query whose class has
    no other example counts as an error here, where pytorch-metric-learning leaves it out;
    embedding tasks have two or more examples per class, so the two agree on them."""
    e = torch.nn.functional.normalize(pred.reshape(pred.shape[0], -1), dim=-1)
    sim = e @ e.transpose(-1, -2)
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=pred.device)
    nearest = torch.where(eye, torch.full_like(sim, -torch.inf), sim).argmax(-1)
    y = target.reshape(-1).long()
    return nan_where_diverged(pred, (y[nearest] != y).to(pred.dtype))


# Whether a larger value is better, for tables and sweepers: every registered kind's metrics
# (metaloss.kinds), and the training loss.
HIGHER_IS_BETTER = kinds.HIGHER_IS_BETTER

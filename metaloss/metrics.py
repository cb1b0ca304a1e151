"""Evaluation metrics per task kind, as namespaced dicts (``{prefix}/acc`` ...)."""

from __future__ import annotations

import torch
from torch import Tensor

# The metric names ``evaluate`` returns per task kind, in order. The one source of truth:
# ``metric_names`` derives expected keys from it, so a consumer (the meta-test) never has
# to learn the keys from whichever runs happened to succeed.
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "regression": ("mse", "mae"),
    "classification": ("acc", "balanced_acc", "macro_f1"),
    "binary": ("acc", "balanced_acc", "macro_f1", "minority_recall"),
    "segmentation": ("dice", "iou"),
}


def metric_names(kind: str, prefix: str = "test") -> list[str]:
    """The keys ``evaluate(kind, ..., prefix=prefix)`` returns, e.g. ``["test/mse", "test/mae"]``."""
    if kind not in METRICS_BY_KIND:
        raise ValueError(f"unknown task kind {kind!r}")
    return [f"{prefix}/{m}" for m in METRICS_BY_KIND[kind]]


def train_result_names(kind: str) -> list[str]:
    """The keys `metaloss.train.train_model` returns: final train loss, then val and test metrics."""
    return ["train/loss", *metric_names(kind, "val"), *metric_names(kind, "test")]


def _recall_per_class(pred: Tensor, y: Tensor, c: int) -> Tensor:
    rec = torch.zeros(c)
    for k in range(c):
        m = y == k
        rec[k] = (pred[m] == k).float().mean() if m.any() else float("nan")
    return rec


def _macro_f1(pred: Tensor, y: Tensor, c: int) -> float:
    f1 = []
    for k in range(c):
        tp = ((pred == k) & (y == k)).sum().item()
        fp = ((pred == k) & (y != k)).sum().item()
        fn = ((pred != k) & (y == k)).sum().item()
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(f1) / len(f1))


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
    """Metrics that fit the task kind, from model outputs ``out`` and targets ``y``.

    regression: mse, mae. classification: acc, balanced_acc, macro_f1. binary: the same
    plus minority_recall (recall of the rarer class in the training split, class 1 if no
    counts). segmentation: per-image dice and iou of the thresholded mask.
    """
    out = out.detach().float().cpu()
    y = y.detach().cpu()
    if not torch.isfinite(out).all():  # argmax of NaN logits picks a class: a diverged model
        return {
            f"{prefix}/{k}": float("nan") for k in METRICS_BY_KIND[kind]
        }  # would score like a guess
    if kind == "regression":
        r = out.reshape(y.shape) - y
        m = {"mse": (r**2).mean().item(), "mae": r.abs().mean().item()}
    elif kind in ("classification", "binary"):
        if kind == "binary":
            c, pred = 2, (out.reshape(-1) > 0).long()
        else:
            c, pred = num_classes or out.shape[-1], out.argmax(-1)
        y = y.long().reshape(-1)
        rec = _recall_per_class(pred, y, c)
        m = {
            "acc": (pred == y).float().mean().item(),
            "balanced_acc": float(rec[~rec.isnan()].mean()),
            "macro_f1": _macro_f1(pred, y, c),
        }
        if kind == "binary":
            minority = int(torch.argmin(class_counts)) if class_counts is not None else 1
            m["minority_recall"] = float(rec[minority])
    elif kind == "segmentation":
        p = (out.reshape(out.shape[0], -1) > 0).float()
        t = y.reshape(p.shape).float()
        tp, fp, fn = (p * t).sum(1), (p * (1 - t)).sum(1), ((1 - p) * t).sum(1)
        empty = (tp + fp + fn) == 0  # nothing predicted, nothing there: a perfect image
        dice = torch.where(empty, 1.0, 2 * tp / (2 * tp + fp + fn).clamp_min(1))
        iou = torch.where(empty, 1.0, tp / (tp + fp + fn).clamp_min(1))
        m = {"dice": dice.mean().item(), "iou": iou.mean().item()}
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    assert tuple(m) == METRICS_BY_KIND[kind], "update METRICS_BY_KIND with evaluate"
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


# Whether a larger value is better, for tables and sweepers.
HIGHER_IS_BETTER = {
    "mse": False,
    "mae": False,
    "acc": True,
    "balanced_acc": True,
    "macro_f1": True,
    "minority_recall": True,
    "dice": True,
    "iou": True,
    "loss": False,
}

"""The fixed-loss catalogue: the baselines every learned loss is compared against.

Each loss is a pure function ``loss(pred, target, *, <hyper-parameters>, **context) -> [B]``
following the contract in :mod:`metaloss.losses.base`; hyper-parameters are keyword-only
and bound by Hydra (``_partial_: true`` in ``conf/loss/<name>.yaml``).

Every loss checks its input shapes first and raises a ``ValueError`` naming the loss and
both shapes, instead of letting broadcasting turn a shape mistake into a wrong number
(``mse(pred [4, 1], target [4])`` would otherwise average a [4, 4] residual):

* regression: ``pred`` and ``target`` of the *same* shape, ``[B, D]`` (or ``[B]`` for both).
  ``[B, 1]`` against ``[B]`` is refused rather than guessed: reshape one side.
* classification / binary: logits ``[B, C]``, or ``[B]`` / ``[B, 1]`` for one binary logit;
  targets are class indices ``[B]`` (integers when ``C > 1``). ``bce`` also takes a target of
  the logits' own shape (``[B, 1]`` with ``[B, 1]``).
* segmentation: per-pixel logits and a mask of the same shape, ``[B, 1, H, W]``.

The checks read only ``.shape``, ``.ndim`` and ``.dtype``, so they cost nothing and work
inside ``torch.func.vmap`` (where shapes are the per-task ones) and ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metaloss.losses.base import (
    CLASSIFICATION,
    binary_as_two_class,
    fits,
    is_binary_logit,
    one_hot,
)

ClassCounts = Sequence[float] | Tensor | None  # per-class counts of the training split


def _shapes(pred: Tensor, target: Tensor) -> str:
    return f"got pred {list(pred.shape)} and target {list(target.shape)}"


def _check_regression(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.ndim == 0 or pred.shape != target.shape:
        hint = (
            " (same number of values: reshape one side, e.g. target.view_as(pred))"
            if pred.ndim > 0 and pred.numel() == target.numel()
            else ""
        )
        raise ValueError(
            f"{name}: pred and target must have the same shape [B, D] (or [B] for "
            f"both), {_shapes(pred, target)}{hint}"
        )


def _check_classification(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.ndim not in (1, 2) or target.ndim != 1 or target.shape[0] != pred.shape[0]:
        raise ValueError(
            f"{name}: expects logits [B, C] (or [B] / [B, 1]: one binary logit) and "
            f"class indices [B], {_shapes(pred, target)}"
        )
    if pred.ndim == 2 and pred.shape[1] > 1 and target.is_floating_point():
        raise ValueError(
            f"{name}: targets must be integer class indices [B] for logits "
            f"{list(pred.shape)}, got a {target.dtype} target (one-hot or soft labels "
            "are not class indices)"
        )


def _check_binary(name: str, pred: Tensor, target: Tensor) -> None:
    one_logit = pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1)
    if not one_logit or not (target.shape == pred.shape[:1] or target.shape == pred.shape):
        raise ValueError(
            f"{name}: expects one logit per example ([B] or [B, 1]) and targets "
            f"[B] in {{0, 1}}, {_shapes(pred, target)}"
        )


def check_segmentation(name: str, pred: Tensor, target: Tensor) -> None:
    """Per-pixel logits and a mask of one shape (also the learned segmentation loss's check)."""
    if pred.ndim < 2 or pred.shape != target.shape:
        raise ValueError(
            f"{name}: expects per-pixel logits and a mask of the same shape "
            f"[B, 1, H, W], {_shapes(pred, target)}"
        )


def _per_example(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (regression outputs, pixels)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


# --------------------------------------------------------------------------- regression


@fits("regression")
def mse(pred: Tensor, target: Tensor, **_: Any) -> Tensor:
    """Squared error."""
    _check_regression("mse", pred, target)
    return _per_example((pred - target) ** 2)


@fits("regression")
def mae(pred: Tensor, target: Tensor, **_: Any) -> Tensor:
    """Absolute error (robust to outliers; median regression)."""
    _check_regression("mae", pred, target)
    return _per_example((pred - target).abs())


@fits("regression")
def huber(pred: Tensor, target: Tensor, *, delta: float = 1.0, **_: Any) -> Tensor:
    """Huber (1964): quadratic within ``delta`` of the target, linear beyond."""
    _check_regression("huber", pred, target)
    r = (pred - target).abs()
    return _per_example(torch.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)))


@fits("regression")
def smooth_l1(pred: Tensor, target: Tensor, *, beta: float = 1.0, **_: Any) -> Tensor:
    """Smooth L1 (Girshick, Fast R-CNN 2015): Huber divided by ``beta``."""
    _check_regression("smooth_l1", pred, target)
    r = (pred - target).abs()
    if beta <= 0:
        return _per_example(r)
    return _per_example(torch.where(r < beta, 0.5 * r**2 / beta, r - 0.5 * beta))


@fits("regression")
def log_cosh(pred: Tensor, target: Tensor, **_: Any) -> Tensor:
    """log(cosh(r)), written stably as r + softplus(-2r) - log 2 for |r|."""
    _check_regression("log_cosh", pred, target)
    r = (pred - target).abs()
    return _per_example(r + F.softplus(-2.0 * r) - math.log(2.0))


@fits("regression")
def quantile(pred: Tensor, target: Tensor, *, tau: float = 0.5, **_: Any) -> Tensor:
    """Pinball loss (Koenker & Bassett 1978) for the ``tau`` quantile."""
    _check_regression("quantile", pred, target)
    r = target - pred
    return _per_example(torch.maximum(tau * r, (tau - 1.0) * r))


@fits("regression")
def poisson(
    pred: Tensor, target: Tensor, *, log_input: bool = True, eps: float = 1e-8, **_: Any
) -> Tensor:
    """Poisson negative log-likelihood without the constant log(y!) term.

    With ``log_input`` the prediction is the log-rate. Targets must be counts (>= 0).
    """
    _check_regression("poisson", pred, target)
    if log_input:
        return _per_example(torch.exp(pred) - target * pred)
    return _per_example(pred - target * torch.log(pred + eps))


# ------------------------------------------------------------------- classification


def _class_weights(
    name: str, pred: Tensor, class_counts: ClassCounts, scheme: str, beta: float
) -> Tensor:
    """Per-class weights from training-split counts (inverse/effective normalised to sum to C)."""
    dtype, device = pred.dtype, pred.device
    if class_counts is None:
        raise ValueError(
            "this loss weights classes by the training split's class counts; pass "
            "class_counts=... in the loss context (metaloss-train does this for you)"
        )
    n = torch.as_tensor(class_counts, dtype=dtype, device=device).clamp_min(1.0)
    c = n.numel()
    classes = 2 if is_binary_logit(pred) else pred.shape[-1]
    if n.ndim != 1 or c != classes:
        raise ValueError(
            f"{name}: class_counts must hold one count per class ({classes} for "
            f"logits {list(pred.shape)}), got shape {list(n.shape)}"
        )
    if scheme == "balanced":  # scikit-learn's "balanced": already averages to 1 per example
        return n.sum() / (c * n)
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "effective":  # Cui et al., CVPR 2019
        w = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=dtype), n))
    else:
        raise ValueError(f"unknown class weighting {scheme!r}; valid: inverse, balanced, effective")
    return w * c / w.sum()


def _log_probs(pred: Tensor) -> Tensor:
    return F.log_softmax(binary_as_two_class(pred), dim=-1)


def _soft_ce(
    logp: Tensor, target: Tensor, *, weight: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """-sum_c w_c q_c log p_c with q the (smoothed) one-hot target; PyTorch's formula."""
    c = logp.shape[-1]
    q = one_hot(target, c, logp.dtype)
    if label_smoothing:
        q = (1.0 - label_smoothing) * q + label_smoothing / c
    if weight is not None:
        q = q * weight
    return -(q * logp).sum(-1)


def _log_p_true(pred: Tensor, target: Tensor) -> Tensor:
    logp = _log_probs(pred)
    return (logp * one_hot(target, logp.shape[-1], logp.dtype)).sum(-1)


@fits(*CLASSIFICATION)
def ce(pred: Tensor, target: Tensor, **_: Any) -> Tensor:
    """Cross-entropy on logits (one logit per example for binary tasks)."""
    _check_classification("ce", pred, target)
    return _soft_ce(_log_probs(pred), target)


@fits("binary")
def bce(pred: Tensor, target: Tensor, *, pos_weight: float | None = None, **_: Any) -> Tensor:
    """Binary cross-entropy on one logit per example."""
    _check_binary("bce", pred, target)
    z = pred.reshape(pred.shape[0], -1).squeeze(-1)
    y = target.reshape(z.shape).to(z.dtype)
    pw = 1.0 if pos_weight is None else pos_weight
    return pw * y * F.softplus(-z) + (1.0 - y) * F.softplus(z)


@fits(*CLASSIFICATION)
def weighted_ce(
    pred: Tensor,
    target: Tensor,
    *,
    scheme: str = "balanced",
    beta: float = 0.999,
    class_counts: ClassCounts = None,
    **_: Any,
) -> Tensor:
    """Class-weighted cross-entropy; weights from the training split's class counts.

    ``scheme``: ``inverse`` (1/N_c), ``balanced`` (N / (C N_c)) or ``effective``
    ((1-β)/(1-β^N_c), Cui et al., "Class-Balanced Loss Based on Effective Number of
    Samples", CVPR 2019).
    """
    _check_classification("weighted_ce", pred, target)
    w = _class_weights("weighted_ce", pred, class_counts, scheme, beta)
    return _soft_ce(_log_probs(pred), target, weight=w)


@fits(*CLASSIFICATION)
def label_smoothing(pred: Tensor, target: Tensor, *, epsilon: float = 0.1, **_: Any) -> Tensor:
    """Cross-entropy against targets smoothed towards uniform (Szegedy et al. 2016)."""
    _check_classification("label_smoothing", pred, target)
    return _soft_ce(_log_probs(pred), target, label_smoothing=epsilon)


@fits(*CLASSIFICATION)
def focal(
    pred: Tensor, target: Tensor, *, alpha: float | None = None, gamma: float = 2.0, **_: Any
) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017): -α_t (1 - p_t)^γ log p_t.

    For binary tasks ``alpha`` weights the positive class and ``1 - alpha`` the
    negative one; for multi-class tasks it is a constant factor. ``None``: no α.
    """
    _check_classification("focal", pred, target)
    log_pt = _log_p_true(pred, target)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        if is_binary_logit(pred):
            y = target.reshape(loss.shape).to(loss.dtype)
            loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
        else:
            loss = alpha * loss
    return loss


@fits(*CLASSIFICATION)
def class_balanced_focal(
    pred: Tensor,
    target: Tensor,
    *,
    beta: float = 0.999,
    gamma: float = 2.0,
    class_counts: ClassCounts = None,
    **_: Any,
) -> Tensor:
    """Focal loss weighted by the effective number of samples per class (Cui et al. 2019)."""
    _check_classification("class_balanced_focal", pred, target)
    w = _class_weights("class_balanced_focal", pred, class_counts, "effective", beta)
    return w[target.long()] * focal(pred, target, gamma=gamma)


@fits(*CLASSIFICATION)
def poly1(pred: Tensor, target: Tensor, *, epsilon: float = 1.0, **_: Any) -> Tensor:
    """Poly-1 (Leng et al., "PolyLoss", ICLR 2022): CE + ε (1 - p_t)."""
    _check_classification("poly1", pred, target)
    log_pt = _log_p_true(pred, target)
    return -log_pt + epsilon * (1.0 - log_pt.exp())


def _margin(pred: Tensor, target: Tensor, margin: float, power: int) -> Tensor:
    if is_binary_logit(pred):  # binary: labels as ±1 on one score
        z = pred.reshape(pred.shape[0])
        s = 2.0 * target.reshape(z.shape).to(z.dtype) - 1.0
        return F.relu(margin - s * z) ** power
    c = pred.shape[-1]
    y = one_hot(target, c, pred.dtype)
    true_score = (pred * y).sum(-1, keepdim=True)
    viol = F.relu(margin - true_score + pred) ** power * (1.0 - y)
    return viol.sum(-1) / c


@fits(*CLASSIFICATION)
def hinge(pred: Tensor, target: Tensor, *, margin: float = 1.0, **_: Any) -> Tensor:
    """Multi-class margin loss (Crammer-Singer style, as torch's MultiMarginLoss, p=1).

    Binary tasks use the ±1 hinge max(0, 1 - y z) on the single logit.
    """
    _check_classification("hinge", pred, target)
    return _margin(pred, target, margin, 1)


@fits(*CLASSIFICATION)
def squared_hinge(pred: Tensor, target: Tensor, *, margin: float = 1.0, **_: Any) -> Tensor:
    """Squared multi-class margin loss (MultiMarginLoss with p=2); binary: max(0, 1 - y z)^2."""
    _check_classification("squared_hinge", pred, target)
    return _margin(pred, target, margin, 2)


@fits(*CLASSIFICATION)
def gce(pred: Tensor, target: Tensor, *, q: float = 0.7, **_: Any) -> Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018): (1 - p_t^q) / q.

    Interpolates CE (q -> 0) and MAE (q = 1); robust to label noise.
    """
    _check_classification("gce", pred, target)
    return (1.0 - torch.exp(q * _log_p_true(pred, target))) / q


# --------------------------------------------------------------------- segmentation


def overlaps(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft TP, FP, FN per image from pixel logits (also the learned segmentation loss's)."""
    p = torch.sigmoid(pred.reshape(pred.shape[0], -1))
    t = target.reshape(p.shape).to(p.dtype)
    tp = (p * t).sum(-1)
    return tp, (p * (1.0 - t)).sum(-1), ((1.0 - p) * t).sum(-1)


@fits("segmentation")
def dice(pred: Tensor, target: Tensor, *, smooth: float = 1.0, **_: Any) -> Tensor:
    """Soft Dice loss (Milletari et al., V-Net 2016): 1 - (2TP + s) / (2TP + FP + FN + s)."""
    check_segmentation("dice", pred, target)
    tp, fp, fn = overlaps(pred, target)
    return 1.0 - (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)


@fits("segmentation")
def iou(pred: Tensor, target: Tensor, *, smooth: float = 1.0, **_: Any) -> Tensor:
    """Soft Jaccard loss (Rahman & Wang 2016): 1 - (TP + s) / (TP + FP + FN + s)."""
    check_segmentation("iou", pred, target)
    tp, fp, fn = overlaps(pred, target)
    return 1.0 - (tp + smooth) / (tp + fp + fn + smooth)


@fits("segmentation")
def tversky(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
    **_: Any,
) -> Tensor:
    """Tversky loss (Salehi et al. 2017): 1 - (TP + s) / (TP + α FP + β FN + s)."""
    check_segmentation("tversky", pred, target)
    tp, fp, fn = overlaps(pred, target)
    return 1.0 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


@fits("segmentation")
def focal_tversky(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.7,
    beta: float = 0.3,
    gamma: float = 0.75,
    smooth: float = 1.0,
    **_: Any,
) -> Tensor:
    """Focal Tversky loss (Abraham & Khan, ISBI 2019): (1 - TI)^γ.

    The base is clamped away from 0 so the gradient stays finite for γ < 1.
    """
    check_segmentation("focal_tversky", pred, target)
    t = tversky(pred, target, alpha=alpha, beta=beta, smooth=smooth)
    return t.clamp_min(1e-6) ** gamma


@fits("segmentation")
def bce_dice(
    pred: Tensor, target: Tensor, *, bce_weight: float = 1.0, smooth: float = 1.0, **_: Any
) -> Tensor:
    """Pixel-mean binary cross-entropy plus soft Dice."""
    check_segmentation("bce_dice", pred, target)
    z = pred.reshape(pred.shape[0], -1)
    t = target.reshape(z.shape).to(z.dtype)
    pix = (t * F.softplus(-z) + (1.0 - t) * F.softplus(z)).mean(-1)
    return bce_weight * pix + dice(pred, target, smooth=smooth)


# ------------------------------------------- long-tail and label-noise baselines (issue 8)


def _log_class_counts(name: str, pred: Tensor, class_counts: ClassCounts) -> Tensor:
    """log n_c of the training split, one per class of ``pred`` (2 for one binary logit).

    Counts are clamped to >= 1 (as :func:`_class_weights` does): a class absent from the
    training split would otherwise get a log-prior of -inf.
    """
    if class_counts is None:
        raise ValueError(
            f"{name}: needs the training split's class counts; pass class_counts=... in the loss "
            "context (metaloss-train and metaloss-meta do this for you)"
        )
    if isinstance(class_counts, Tensor):  # stays a (vmapped) tensor: as_tensor would not
        n = class_counts.to(dtype=pred.dtype, device=pred.device)
    else:
        n = torch.as_tensor(class_counts, dtype=pred.dtype, device=pred.device)
    classes = 2 if is_binary_logit(pred) else pred.shape[-1]
    if n.ndim != 1 or n.shape[0] != classes:
        raise ValueError(
            f"{name}: class_counts must hold one count per class ({classes} for "
            f"logits {list(pred.shape)}), got shape {list(n.shape)}"
        )
    return torch.log(n.clamp_min(1.0))


@fits(*CLASSIFICATION)
def logit_adjusted_ce(
    pred: Tensor, target: Tensor, *, tau: float = 1.0, class_counts: ClassCounts = None, **_: Any
) -> Tensor:
    """Logit-adjusted loss (Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-tail learning
    via logit adjustment", ICLR 2021): CE(z + τ log π, y), π the training split's class prior.

    ``tau`` = 0 is cross-entropy; ``tau`` = 1 is balanced softmax (:func:`balanced_softmax`).
    Needs ``class_counts`` in the loss context. Binary tasks: the prior of the two classes
    is added to the two-class logits (0, z).
    """
    _check_classification("logit_adjusted_ce", pred, target)
    adjust = tau * log_prior("logit_adjusted_ce", pred, class_counts)
    return _soft_ce(F.log_softmax(binary_as_two_class(pred) + adjust, dim=-1), target)


def log_prior(name: str, pred: Tensor, class_counts: ClassCounts) -> Tensor:
    """log π_c, the training split's class prior, one per class of ``pred`` (2 for one binary
    logit); ``name`` is the loss that needs it, for the error when ``class_counts`` is absent."""
    log_n = _log_class_counts(name, pred, class_counts)
    return log_n - torch.logsumexp(log_n, dim=-1, keepdim=True)


@fits(*CLASSIFICATION)
def balanced_softmax(
    pred: Tensor, target: Tensor, *, class_counts: ClassCounts = None, **_: Any
) -> Tensor:
    """Balanced softmax (Ren, Yu, Sheng, Ma, Zhao, Yi, Li, "Balanced Meta-Softmax for
    Long-Tailed Visual Recognition", NeurIPS 2020): CE(z + log n_c, y), n_c the training
    split's class counts (the logit-adjusted loss with τ = 1). Needs ``class_counts``.
    """
    _check_classification("balanced_softmax", pred, target)
    log_n = _log_class_counts("balanced_softmax", pred, class_counts)
    return _soft_ce(F.log_softmax(binary_as_two_class(pred) + log_n, dim=-1), target)


@fits(*CLASSIFICATION)
def symmetric_ce(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = -4.0,
    **_: Any,
) -> Tensor:
    """Symmetric cross-entropy (Wang, Ma, Chen, Luo, Yi, Bailey, "Symmetric Cross Entropy for
    Robust Learning with Noisy Labels", ICCV 2019): α CE + β RCE.

    RCE = -Σ_k p_k log q_k with q the one-hot label and log 0 clamped to A = ``log_zero``
    (the paper's A = -4), which is exactly -A (1 - p_y). Defaults α = 0.1, β = 1 are the
    paper's CIFAR-10 setting. (The authors' code clamps q to 1e-4 instead: log_zero = -9.21.)
    """
    _check_classification("symmetric_ce", pred, target)
    log_pt = _log_p_true(pred, target)
    return alpha * -log_pt + beta * (-log_zero) * (1.0 - log_pt.exp())


@fits(*CLASSIFICATION)
def mae_cls(pred: Tensor, target: Tensor, **_: Any) -> Tensor:
    """MAE for classification (Ghosh, Kumar, Sastry, "Robust Loss Functions under Label Noise
    for Deep Neural Networks", AAAI 2017): Σ_k |p_k - q_k| = 2 (1 - p_y), symmetric, hence
    noise-tolerant. (The regression ``mae`` is a different loss on raw predictions.)
    """
    _check_classification("mae_cls", pred, target)
    return 2.0 * (1.0 - _log_p_true(pred, target).exp())

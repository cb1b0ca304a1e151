"""The loss contract shared by fixed and parametric losses.

A loss is called as ``loss(pred, target, **context)`` and returns a per-example tensor of
shape ``[B]``; the caller reduces. ``context`` carries optional extras a loss may use
(``class_counts`` of the training split, the inputs ``x``, the training progress ``t`` in
[0, 1]); a loss ignores what it does not need.

Shapes by task kind:

* ``regression``: ``pred`` and ``target`` are ``[B, D]`` floats.
* ``classification``: ``pred`` are logits ``[B, C]``, ``target`` class indices ``[B]``.
* ``binary``: ``pred`` is one logit per example (``[B]`` or ``[B, 1]``), ``target`` in {0, 1}.
* ``segmentation``: ``pred`` are per-pixel logits ``[B, 1, H, W]``, ``target`` a {0, 1}
  mask of the same shape.

Every loss declares the task kinds it fits in ``kinds`` (a function attribute set by
:func:`fits` for fixed losses, a class attribute for parametric ones), so that a run can
refuse a loss that does not fit its task before any training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TASK_KINDS = ("regression", "classification", "binary", "segmentation")
CLASSIFICATION = ("classification", "binary")


def fits(*kinds: str) -> Callable:
    """Decorator recording the task kinds a fixed loss function supports."""
    unknown = set(kinds) - set(TASK_KINDS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; valid: {TASK_KINDS}")

    def mark(fn: Callable) -> Callable:
        fn.kinds = frozenset(kinds)
        return fn

    return mark


def loss_kinds(loss: Any) -> frozenset[str]:
    """The task kinds a loss object (function, ``functools.partial`` or module) fits."""
    inner = getattr(loss, "func", loss)  # functools.partial from Hydra `_partial_: true`
    kinds = getattr(inner, "kinds", None)
    if kinds is None:
        raise TypeError(
            f"{inner!r} does not declare the task kinds it fits; decorate a function with "
            "@metaloss.losses.base.fits(...) or set `kinds` on a ParametricLoss subclass"
        )
    return frozenset(kinds)


class ParametricLoss(nn.Module):
    """Base class of meta-learned losses: ``parameters()`` are the meta-parameters φ.

    Subclasses set ``kinds`` and implement ``forward(pred, target, **context) -> [B]``.
    They hold no device, learning rate or reduction state, and must not mutate their
    parameters in place (the engine calls them through ``torch.func.functional_call``).
    ``init_kwargs`` must hold the constructor arguments, so a learned loss can be saved
    and rebuilt (see :mod:`metaloss.losses.io`).
    """

    kinds: tuple[str, ...] = ()

    def __init__(self, **init_kwargs: Any) -> None:
        super().__init__()
        self.init_kwargs = dict(init_kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **context: Any) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, init_kwargs: dict, state_dict: dict) -> ParametricLoss:
        """Rebuild from a saved file; subclasses skip expensive initialisation here."""
        loss = cls(**init_kwargs)
        loss.load_state_dict(state_dict)
        return loss


def loss_context(class_counts: torch.Tensor | None, x: torch.Tensor | None, t: float) -> dict[str, Any]:
    """The one place the loss context is built: the training split's class counts, the
    inputs ``x`` and the training progress ``t`` in [0, 1] (see the module docstring)."""
    return {"class_counts": class_counts, "x": x, "t": t}


def binary_as_two_class(logits: torch.Tensor) -> torch.Tensor:
    """Map one binary logit z to the two-class logits (0, z): softmax of it is sigmoid(z).

    Multi-class logits ``[B, C]`` with ``C > 1`` pass through unchanged, so every
    classification loss works on binary tasks without a separate implementation.
    """
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.shape[-1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    return logits


def one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot that works under ``vmap`` (``F.one_hot`` does not)."""
    classes = torch.arange(num_classes, device=target.device)
    return (target.long()[..., None] == classes).to(dtype)


def is_binary_logit(pred: torch.Tensor) -> bool:
    return pred.ndim == 1 or pred.shape[-1] == 1

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
from typing import Any, TypeVar

import torch
from torch import nn

from metaloss import kinds

TASK_KINDS = kinds.KINDS  # the kinds registry (metaloss.kinds): a kind registered there fits
CLASSIFICATION = ("classification", "binary")


def fits(*kinds: str) -> Callable:
    """Decorator recording the task kinds a fixed loss function supports."""
    unknown = set(kinds) - set(TASK_KINDS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; valid: {sorted(TASK_KINDS)}")

    def mark(fn: Callable) -> Callable:
        # a function attribute (``Callable`` does not declare it: hence setattr)
        setattr(fn, "kinds", frozenset(kinds))  # noqa: B010
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


_L = TypeVar("_L", bound="ParametricLoss")


class ParametricLoss(nn.Module):
    """Base class of meta-learned losses: ``parameters()`` are the meta-parameters φ.

    Subclasses set ``kinds`` and implement ``forward(pred, target, **context) -> [B]``.
    They hold no device, learning rate or reduction state, and must not mutate their
    parameters in place (the engine calls them through ``torch.func.functional_call``).
    ``init_kwargs`` must hold the constructor arguments, so a learned loss can be saved
    and rebuilt (see :mod:`metaloss.losses.io`).
    """

    kinds: tuple[str, ...] = ()
    # Set only on a loss that :func:`metaloss.losses.io.load_learned_loss` rebuilt from a file
    # (absent otherwise: code that takes any loss reads them with ``getattr(loss, name, default)``).
    meta: dict[str, Any]
    source: str
    allow_other_task: bool

    def __init__(self, **init_kwargs: Any) -> None:
        super().__init__()
        self.init_kwargs = dict(init_kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **context: Any) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_saved(cls: type[_L], init_kwargs: dict, state_dict: dict) -> _L:
        """Rebuild from a saved file; subclasses skip expensive initialisation here."""
        loss = cls(**init_kwargs)
        loss.load_state_dict(state_dict)
        return loss


def loss_context(
    class_counts: torch.Tensor | None, x: torch.Tensor | None, t: float
) -> dict[str, Any]:
    """The one place the loss context is built: the training split's class counts, the
    inputs ``x`` and the training progress ``t`` in [0, 1] (see the module docstring)."""
    return {"class_counts": class_counts, "x": x, "t": t}


class LossContractError(ValueError):
    """A loss that does not return one value per example (the loss contract), found by a probe."""


PROBE_BATCH = 3  # examples in the probe batch (raised past any other size of pred and target)


def _probe_batch(task: Any) -> tuple[Any, Any, Any]:
    """(pred, target, x) for a small batch of the task's training split, ``pred`` shaped as the
    contract says a model's output is for this kind (random logits / values, drawn from a
    fixed local generator: the global RNG is not touched). The batch size differs from every
    other dimension of pred and target, so a result of the wrong shape cannot pass by chance."""
    x_all, y_all = task.x_train, task.y_train
    y_dims = set(y_all.shape[1:])
    by_class = kinds.get(task.kind).class_indices  # else targets are shaped like predictions
    out_dims = {task.out_dim} if by_class else set(y_all.shape[1:])
    b = PROBE_BATCH
    while b in y_dims | out_dims | {task.num_classes}:
        b += 1
    idx = torch.arange(b) % len(x_all)
    x, y = x_all[idx.to(x_all.device)], y_all[idx.to(y_all.device)]
    shape = (b, task.out_dim) if by_class else tuple(y.shape)
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    pred = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(x.device)
    return pred, y, x


def check_loss_output(loss: Any, task: Any, loss_name: str | None) -> None:
    """Call the loss once on a probe batch of the task's shape and refuse it, naming it and the
    expected and actual shapes, unless it returns one value per example (``[B]``): a
    broadcasting bug (``[B, B]``) or a loss that reduces itself (a scalar) would otherwise be
    averaged into a plausible, wrong training signal. Every training path builds its losses
    through :func:`metaloss.config.check_loss` (metaloss-train, metaloss-meta's inner loop and
    objective, the meta-test's baselines and learned loss, tuning), so this runs once per loss,
    before the first step; inside ``vmap`` the per-task shapes are these same shapes."""
    name = (
        loss_name or getattr(getattr(loss, "func", loss), "__name__", None) or type(loss).__name__
    )
    pred, y, x = _probe_batch(task)
    b = len(y)
    try:
        out = loss(pred, y, **loss_context(task.class_counts, x, 0.0))
    except Exception as e:
        raise LossContractError(
            f"loss {name!r} fails on a probe batch of task {task.name!r} (pred "
            f"{list(pred.shape)}, target {list(y.shape)}): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, torch.Tensor):
        raise LossContractError(
            f"loss {name!r} returned a {type(out).__name__}, not a tensor; the loss "
            f"contract: loss(pred, target, **context) -> per-example tensor [B]"
        )
    if tuple(out.shape) != (b,):
        hint = (
            " (it reduced over the batch itself: return the per-example values, the caller reduces)"
            if out.ndim == 0
            else " (a broadcasting bug? e.g. pred [B, 1] minus target [B] gives [B, B])"
            if out.ndim >= 2 and out.shape[0] == b
            else ""
        )
        raise LossContractError(
            f"loss {name!r} returned shape {list(out.shape)} for a batch of {b} examples of "
            f"task {task.name!r} (pred {list(pred.shape)}, target {list(y.shape)}); expected "
            f"[{b}]: one value per example{hint}"
        )
    if not out.is_floating_point():
        raise LossContractError(
            f"loss {name!r} returned dtype {out.dtype}; a loss returns floating-point values"
        )


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

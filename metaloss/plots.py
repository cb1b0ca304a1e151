"""Pictures of losses: the learned loss beside the baselines, as a function of the prediction."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from metaloss.losses.base import loss_context


@torch.no_grad()
def loss_curves(
    losses: dict[str, Callable],
    kind: str,
    num_classes: int | None = None,
    n: int = 200,
    class_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
    """x grid and each loss along it: loss vs ŷ for y = 0 (regression), loss vs p_true
    (classification, the other classes sharing 1 - p_true equally; binary: one logit).

    With the training split's ``class_counts`` (classification), the true class is the
    rarest one and the losses that need counts (weighted CE, logit adjustment, balanced
    softmax) get them: they are drawn where they differ most from CE, not left out."""
    if kind == "regression":
        x = torch.linspace(-3, 3, n)
        pred, target, label = x[:, None], torch.zeros(n, 1), "prediction ŷ (target y = 0)"
    elif kind == "segmentation":
        # one 8x8 image per grid point with a 4x4 foreground square (25%); every pixel gives
        # its true label probability x
        x = torch.linspace(0.005, 0.995, n)
        target = torch.zeros(n, 1, 8, 8)
        target[..., 2:6, 2:6] = 1.0
        z = torch.logit(x)[:, None, None, None]
        pred = torch.where(target > 0, z, -z)
        label = "probability of the true label at every pixel (8x8 mask, 25% foreground)"
    else:
        x = torch.linspace(0.005, 0.995, n)
        counts = None if class_counts is None else class_counts.detach().float().cpu()
        if counts is not None and counts.max() < 2 * counts.min():
            counts = (
                None  # about balanced: no class is "the rarest" (the losses still get the counts)
            )
        if kind == "binary":
            cls = 1 if counts is None else int(counts.argmin())
            z = torch.logit(x)[:, None]
            pred, target = (z if cls == 1 else -z), torch.full((n,), cls, dtype=torch.long)
        else:
            c = num_classes or 2
            cls = 0 if counts is None else int(counts.argmin())
            rest = torch.log((1 - x) / (c - 1))[:, None].expand(n, c).clone()
            pred = torch.where(torch.arange(c) == cls, torch.log(x)[:, None], rest)
            target = torch.full((n,), cls, dtype=torch.long)
        label = (
            "probability of the true class p_true"
            if counts is None
            else f"p_true of class {cls}, the rarest ({int(counts[cls])} training examples)"
        )
    ctx = (
        loss_context(class_counts, None, 1.0)
        if kind in ("binary", "classification")
        else loss_context(None, None, 1.0)
    )
    curves = {}
    for name, fn in losses.items():
        ref = next(fn.parameters(), None) if isinstance(fn, torch.nn.Module) else None
        p, t = (
            (pred, target)
            if ref is None
            else (pred.to(ref.device, ref.dtype), target.to(ref.device))
        )
        if ref is not None and t.is_floating_point():
            t = t.to(ref.dtype)
        try:
            curves[name] = fn(p, t, **ctx).detach().float().cpu()
        except (ValueError, TypeError):
            continue  # e.g. a loss that needs class counts
    return x, curves, label


def plot_losses(
    losses: dict[str, Callable],
    kind: str,
    path: str | Path,
    *,
    num_classes: int | None = None,
    class_counts: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, raw, label = loss_curves(losses, kind, num_classes, class_counts=class_counts)
    # Constants do not change gradients: draw every curve with its minimum at 0.
    curves = {
        name: y - y[torch.isfinite(y)].min()
        if bool(torch.isfinite(y).any())
        else y  # all-NaN: nothing to shift
        for name, y in raw.items()
    }
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, y in curves.items():
        learned = name == "learned"
        ax.plot(
            x,
            y,
            lw=2.5 if learned else 1.2,
            ls="-" if learned else "--",
            label=name,
            color="black" if learned else None,
        )
    finite = (
        torch.cat([y[torch.isfinite(y)] for y in curves.values()]) if curves else torch.zeros(0)
    )
    if len(finite):
        hi = float(torch.quantile(finite, 0.95))
        ax.set_ylim(
            min(0.0, float(finite.min())) - 0.05, hi * 1.2 if hi > 0 and math.isfinite(hi) else None
        )
    ax.set_xlabel(label)
    ax.set_ylabel("per-example loss (shifted to min 0)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

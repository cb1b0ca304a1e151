"""Pictures of losses: the learned loss beside the baselines, as a function of the prediction."""

from __future__ import annotations

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
    if kind == "embedding":
        return _pair_curves(losses, n)
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


def _pair_curves(
    losses: dict[str, Callable], n: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
    """Embedding losses along the anchor-positive cosine similarity s: a batch of three, the
    anchor, a positive at similarity s and a negative orthogonal to both; the anchor's value.
    (A pair loss is a function of the whole batch, so each grid point is its own batch.)"""
    x = torch.linspace(-0.99, 0.99, n)
    target = torch.tensor([0, 0, 1])
    curves = {}
    for name, fn in losses.items():
        ref = next(fn.parameters(), None) if isinstance(fn, torch.nn.Module) else None
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else torch.device("cpu")
        values = []
        try:
            for s in x.tolist():
                pred = torch.tensor(
                    [[1.0, 0.0, 0.0], [s, (1 - s * s) ** 0.5, 0.0], [0.0, 0.0, 1.0]],
                    dtype=dtype,
                    device=device,
                )
                ctx = loss_context(None, None, 1.0)
                values.append(fn(pred, target.to(device), **ctx)[0])
        except (ValueError, TypeError):
            continue  # a loss that cannot take this three-example batch is left out
        curves[name] = torch.stack(values).detach().float().cpu()
    return x, curves, "cosine similarity of the anchor to its positive (negative at 0)"


def _gradients(
    losses: dict[str, Callable], kind: str, num_classes: int | None, class_counts, n: int = 200
) -> dict[str, torch.Tensor]:
    """Each loss's derivative along the grid of :func:`loss_curves`, with respect to the
        prediction (regression), the true class's logit (classification) or the logit (binary):
        what the inner optimizer actually follows. Segmentation and embedding: none (a whole image,
    a whole batch per point)."""
    if kind in ("segmentation", "embedding"):
        return {}
    out = {}
    for name, fn in losses.items():
        _, curves, _ = loss_curves({name: _Grad(fn)}, kind, num_classes, n, class_counts)
        if name in curves:
            out[name] = curves[name]
    return out


class _Grad:
    """A loss wrapped to return, instead of its values, d loss / d (the plotted coordinate):
    the prediction (regression, binary logit) or the true class's logit."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, pred, target, **ctx):  # ctx carries its own `t` (training progress)
        with torch.enable_grad():
            pred = pred.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.fn(pred, target, **ctx).sum(), pred, allow_unused=True)
        if g is None:
            return torch.zeros(len(pred))
        if pred.ndim == 2 and pred.shape[1] > 1 and not target.is_floating_point():
            return g.gather(1, target.view(-1, 1)).squeeze(1)
        return g.reshape(len(pred), -1)[:, 0]


def plot_losses(
    losses: dict[str, Callable],
    kind: str,
    path: str | Path,
    *,
    num_classes: int | None = None,
    class_counts: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """The losses' shapes on shared axes: each loss scaled to [0, 1] over the grid (shape, not
    scale: a learned loss's scale would swamp the baselines), and beside it the derivative the
    inner optimizer follows, scaled by its largest magnitude. The learned loss is drawn thick
    in the learned colour of :mod:`metaloss.figures`. Writes ``path`` (PNG) and a PDF beside it."""
    from metaloss.figures import BASELINES, LEARNED, save, style

    x, raw, label = loss_curves(losses, kind, num_classes, class_counts=class_counts)
    grads = _gradients({n: losses[n] for n in raw}, kind, num_classes, class_counts)

    def scaled(y: torch.Tensor, signed: bool) -> torch.Tensor:
        ok = y[torch.isfinite(y)]
        if not len(ok):
            return y
        if signed:
            top = ok.abs().max()
            return y / top if top > 0 else y
        lo, hi = ok.min(), ok.max()
        return (y - lo) / (hi - lo) if hi > lo else y - lo

    panels = [("loss, scaled to [0, 1]", {n: scaled(y, False) for n, y in raw.items()})]
    if grads:
        panels.append(
            (
                "d loss / d "
                + ("prediction" if kind == "regression" else "true-class logit")
                + ", scaled",
                {n: scaled(y, True) for n, y in grads.items()},
            )
        )
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
        for ax, (ylabel, curves) in zip(axes.flat, panels):
            for i, (name, y) in enumerate(curves.items()):
                learned = name == "learned"
                ax.plot(
                    x,
                    y,
                    lw=2.4 if learned else 1.1,
                    ls="-" if learned else ("--", "-.", ":", (0, (5, 1, 1, 1)))[i % 4],
                    color=LEARNED if learned else BASELINES[i % len(BASELINES)],
                    label=name,
                    zorder=3 if learned else 2,
                )
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
        axes.flat[0].legend(loc="best", frameon=False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        save(fig, path)
        plt.close(fig)
    return Path(path)

"""Figures for papers: one style, PNG and PDF, per-seed points with means and 95% intervals.

* :func:`style` — the one matplotlib style every metaloss figure is drawn in (a context
  manager: nothing leaks into the user's own plots);
* :func:`save` — a figure written as ``<name>.png`` (for W&B and READMEs) and ``<name>.pdf``
  (vector, for LaTeX), atomically;
* :func:`comparison_figure` — one panel per metric: every loss on its own row (labels never
  overlap), every seed's value as a point, the mean with its 95% Student-t interval, the
  learned loss highlighted, and the paired test against the reference tuned baseline marked
  beside each loss (``*`` p < 0.05, ``**`` p < 0.01, ``***`` p < 0.001 after Holm; ``n.s.``).

Library code: draws and writes, never logs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

LEARNED = "#c0392b"  # the learned loss, in every figure
BASELINE = "#34495e"
REFERENCE = "#2874a6"  # the reference tuned baseline
# baselines drawn as lines: distinct, none of them the learned loss's red
BASELINES = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 110,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # TrueType in PDFs: journals' requirement, and editable text
}


@contextmanager
def style() -> Iterator[Any]:
    """``with style() as plt:`` — matplotlib (Agg) in metaloss's style, for this block only."""
    import logging

    import matplotlib

    # PDF font subsetting logs every table it prunes at INFO, which Hydra's log shows
    logging.getLogger("fontTools").setLevel(logging.WARNING)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(cast(Any, RC)):
        yield plt


def save(fig: Any, path: str | Path) -> list[Path]:
    """``fig`` as PNG and PDF beside each other (``path``'s suffix is replaced); returns both."""
    from metaloss.runs import atomic_write

    base = Path(path).with_suffix("")
    out = []
    for ext in ("png", "pdf"):
        target = base.with_suffix("." + ext)

        def write(tmp: Path, fmt: str = ext) -> None:
            fig.savefig(tmp, format=fmt)

        atomic_write(target, write)
        out.append(target)
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean of the finite values and the half-width of its Student-t interval (NaN for fewer
    than two values), and how many values were finite."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return math.nan, math.nan, 0
    if len(a) == 1:
        return float(a[0]), math.nan, 1
    half = float(stats.t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()), half, len(a)


def stars(p: float, alpha: float = 0.05) -> str:
    """Significance mark of a (Holm-adjusted) p-value."""
    if not math.isfinite(p):
        return ""
    if p < 0.001:
        return "***"
    if p < 0.01:
        return "**"
    return "*" if p < alpha else "n.s."


def comparison_figure(
    results: Mapping[str, Mapping[str, Sequence[float | None]]],
    path: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    significance: Mapping[str, Any] | None = None,
    learned: str = "learned",
    title: str = "",
) -> list[Path]:
    """The meta-test of ``results`` ({loss: {metric: [value per seed]}}, ``None`` = diverged)
    as a dot-and-interval plot, one panel per metric (``metrics``: default every ``test/``
    metric). ``significance`` (a comparison.json's): its reference baseline is drawn in its own
    colour and the learned loss's paired test against each baseline is marked on the metric it
    was decided on. Writes PNG and PDF; returns their paths."""
    losses = list(results)
    names = metrics or sorted(
        {m for r in results.values() for m in r if str(m).startswith("test/")}
    )
    sig = dict(significance or {})
    reference = sig.get("best_baseline")
    decided_on = sig.get("metric")
    pairwise = sig.get("pairwise") or {}
    with style() as plt:
        cols = max(1, min(3, len(names)))
        rows = max(1, math.ceil(len(names) / cols))
        height = 0.38 * len(losses) + 1.0
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.6 * cols, height * rows), squeeze=False, sharey=True
        )
        ys = np.arange(len(losses))[::-1]  # the first loss on top
        rng = np.random.default_rng(0)  # jitter only: the same figure every time
        for ax, metric in zip(axes.flat, names):
            for y, loss in zip(ys, losses):
                raw = [math.nan if v is None else float(v) for v in results[loss].get(metric, [])]
                color = (
                    LEARNED if loss == learned else (REFERENCE if loss == reference else BASELINE)
                )
                finite = [v for v in raw if math.isfinite(v)]
                jitter = rng.uniform(-0.12, 0.12, len(finite))
                ax.scatter(finite, y + jitter, s=12, color=color, alpha=0.45, lw=0, zorder=2)
                mean, half, n = mean_ci(raw)
                if n:
                    ax.errorbar(
                        mean,
                        y,
                        xerr=None if math.isnan(half) else half,
                        fmt="D" if loss == learned else "o",
                        ms=6 if loss == learned else 5,
                        color=color,
                        capsize=3,
                        lw=1.6,
                        zorder=3,
                    )
                if n < len(raw):
                    ax.annotate(
                        f"{len(raw) - n}/{len(raw)} diverged",
                        (0.01, y),
                        xycoords=("axes fraction", "data"),
                        xytext=(0, -10),
                        textcoords="offset points",
                        ha="left",
                        va="center",
                        fontsize=7,
                        color="tab:red",
                    )
                if metric == decided_on and loss in pairwise and loss != learned:
                    test = pairwise[loss]
                    mark = stars(float(test.get("p_value_holm", math.nan)))
                    if mark and mark != "n.s.":
                        better = (float(test["difference"]) > 0) == bool(
                            sig.get("higher_is_better", True)
                        )
                        mark += " learned better" if better else " learned worse"
                    ax.annotate(
                        mark,
                        (0.99, y),
                        xycoords=("axes fraction", "data"),
                        xytext=(0, 5),
                        textcoords="offset points",
                        ha="right",
                        fontsize=7,
                        color=LEARNED,
                    )
            ax.set_title(metric + (" (decides)" if metric == decided_on else ""))
            ax.set_yticks(ys)
            ax.set_yticklabels([f"{n} (ref.)" if n == reference else n for n in losses])
            ax.margins(x=0.08)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        note = "points: seeds; marker and bar: mean and 95% CI"
        if pairwise:
            note += (
                "; marks: learned vs each baseline, paired t, Holm (* p<.05, ** <.01, *** <.001)"
            )
        fig.text(0.0, -0.02, note, fontsize=7, ha="left", va="top", color="0.35")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        written = save(fig, path)
        plt.close(fig)
    return written

"""Tables and plots from finished runs: ``metrics.json`` of `metaloss-train` multiruns and
``comparison.json`` of meta-tests. Library code: returns data, writes files, never logs."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from metaloss.metrics import HIGHER_IS_BETTER

IGNORED_OVERRIDES = ("seed", "logger", "progress", "hydra.")


def _overrides(run_dir: Path) -> list[str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    return [o for o in (yaml.safe_load(f.read_text()) or [])
            if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)]


def collect(root: str | Path) -> dict[str, dict[str, list[float]]]:
    """``{group: {metric: [value per seed/run]}}`` from every result file under ``root``.

    A `metrics.json` run is grouped by the Hydra overrides that vary across the runs
    found, other than the seed (e.g. ``loss=mse``); a `comparison.json` by loss name.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    runs = [(f, json.loads(f.read_text()), _overrides(f.parent)) for f in sorted(root.rglob("metrics.json"))]
    common = set.intersection(*(set(o) for _, _, o in runs)) if runs else set()
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f, rec, overrides in runs:
        label = ",".join(o for o in overrides if o not in common) or rec.get("loss") or f.parent.name
        for k, v in rec["metrics"].items():
            groups[label][k].append(float(v))
    for f in sorted(root.rglob("comparison.json")):
        rec = json.loads(f.read_text())
        for loss, metrics in rec["results"].items():
            for k, values in metrics.items():
                groups[loss][k].extend(float(v) for v in values)
    if not groups:
        raise FileNotFoundError(f"no metrics.json or comparison.json under {root}")
    return {g: dict(m) for g, m in groups.items()}


def summarize(groups: dict[str, dict[str, list[float]]], prefix: str = "test/") -> dict:
    """Mean, std (ddof=1) and n per group and metric, for metrics starting with ``prefix``."""
    out: dict = {}
    for g, metrics in groups.items():
        out[g] = {}
        for k, vals in metrics.items():
            if not k.startswith(prefix):
                continue
            a = np.asarray(vals, dtype=float)
            out[g][k] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                         "n": len(a)}
    return out


def format_table(summary: dict) -> str:
    """Markdown table, one row per group; the best mean per metric is in bold."""
    metrics = sorted({k for g in summary.values() for k in g})
    best = {}
    for k in metrics:
        higher = HIGHER_IS_BETTER.get(k.split("/")[-1], True)
        means = {g: s[k]["mean"] for g, s in summary.items() if k in s}
        best[k] = (max if higher else min)(means, key=means.get)
    head = "| run | n | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for g, s in summary.items():
        n = max((v["n"] for v in s.values()), default=0)
        cells = []
        for k in metrics:
            if k not in s:
                cells.append("")
                continue
            cell = f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}"
            cells.append(f"**{cell}**" if best[k] == g else cell)
        lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> Path:
    """Bar chart with ±1 std error bars, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for g in summary.values() for k in g})
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    groups = list(summary)
    for ax, k in zip(axes.flat, metrics):
        means = [summary[g].get(k, {}).get("mean", np.nan) for g in groups]
        stds = [summary[g].get(k, {}).get("std", 0.0) for g in groups]
        ax.bar(range(len(groups)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(k)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

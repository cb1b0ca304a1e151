"""Meta-test: train fresh models from scratch with the learned loss and each baseline —
same seeds, data and budget — and test whether the learned loss differs from the best one."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from metaloss.metrics import HIGHER_IS_BETTER
from metaloss.tasks.base import Task
from metaloss.train import NonFiniteLoss, build_model, train_model

log = logging.getLogger("metaloss")


def compare_losses(tasks_for_seed: Callable[[int], Sequence[Task]], factory: Callable,
                   losses: dict[str, Callable], make_optimizer: Callable, *, seeds: Sequence[int],
                   steps: int, batch_size: int | None, progress: bool = True
                   ) -> dict[str, dict[str, list[float]]]:
    """``{loss: {metric: [value per seed]}}``; a seed's value is the mean over its tasks.

    A loss that diverges (NaN) on a seed is recorded as NaN for that seed and logged —
    never silently dropped.
    """
    results: dict[str, dict[str, list[float]]] = {name: {} for name in losses}
    bar = tqdm(total=len(seeds) * len(losses), desc="meta-test", disable=not progress, mininterval=1.0)
    for seed in seeds:
        tasks = tasks_for_seed(seed)
        for name, loss in losses.items():
            bar.set_postfix(loss=name, seed=seed, refresh=False)
            per_task = []
            for i, task in enumerate(tasks):
                model = build_model(factory, task, seed * 1000 + i)
                try:
                    m = train_model(task, model, loss, make_optimizer, steps=steps, batch_size=batch_size,
                                    seed=seed * 1000 + i, progress=False)
                except NonFiniteLoss as e:
                    log.warning("meta-test: %s diverged on seed %d task %d (%s); recorded as NaN", name, seed, i, e)
                    m = None
                per_task.append(m)
            keys = sorted({k for m in per_task if m for k in m})
            for k in keys:
                vals = [m[k] if m else float("nan") for m in per_task]
                results[name].setdefault(k, []).append(float(np.mean(vals)))
            bar.update()
    bar.close()
    return results


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test (NaN if undefined)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    if a.std() == 0 and b.std() == 0:
        return 0.0 if a.mean() != b.mean() else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def significance(results: dict[str, dict[str, list[float]]], metric: str, learned: str = "learned",
                 alpha: float = 0.05) -> dict:
    """Learned loss vs the best baseline on ``metric`` (by mean), Welch's t-test."""
    higher = HIGHER_IS_BETTER.get(metric.split("/")[-1], True)
    baselines = {n: r[metric] for n, r in results.items() if n != learned and metric in r}
    if learned not in results or not baselines:
        return {}
    means = {n: float(np.nanmean(v)) for n, v in baselines.items()}
    best = (max if higher else min)(means, key=means.get)
    ours = results[learned][metric]
    p = welch(ours, baselines[best])
    diff = float(np.mean(ours) - means[best])
    better = (diff > 0) == higher and diff != 0
    verdict = ("no significant difference" if math.isnan(p) or p >= alpha
               else ("significantly better" if better else "significantly worse"))
    return {"metric": metric, "best_baseline": best, "learned_mean": float(np.mean(ours)),
            "best_baseline_mean": means[best], "difference": diff, "p_value": p, "alpha": alpha,
            "test": "Welch's t-test (two-sided)", "verdict": verdict}

"""Meta-test: train fresh models from scratch with the learned loss and each baseline —
same seeds, data and budget — and test whether the learned loss differs from a reference
baseline fixed on the validation split (:func:`significance`).

Guarantees: every loss gets exactly one value per seed for every metric the task kind
produces (NaN where it diverged, with a warning naming loss, seed and task); a baseline
with a NaN is never the reference; a verdict is never "no significant difference" when NaNs
make it undefined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from metaloss.inner.optimizers import InnerOptimizer
from metaloss.losses.base import check_loss_output
from metaloss.metrics import HIGHER_IS_BETTER, train_result_names
from metaloss.tasks.base import Task
from metaloss.train import NonFiniteLoss, build_model, train_model
from metaloss.train_many import train_many

log = logging.getLogger("metaloss")

Results = dict[str, dict[str, list[float]]]  # {loss: {metric: [value per seed]}}
PAIRED_TEST = "paired t-test (scipy.stats.ttest_rel, two-sided)"


def _train_one(
    task: Task,
    factory: Callable,
    loss: Callable,
    make_optimizer: Callable,
    *,
    steps: int,
    batch_size: int | None,
    seed: int,
    where: str,
) -> dict[str, float] | None:
    """Final metrics of one fresh model, or None if its training loss diverged."""
    model = build_model(factory, task, seed)
    try:
        return train_model(
            task,
            model,
            loss,
            make_optimizer,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            progress=False,
        )
    except NonFiniteLoss as e:
        log.warning("meta-test: %s diverged (%s); recorded as NaN", where, e)
        return None


def _seed_value(per_task: list[dict[str, float] | None], key: str) -> float:
    """A seed's value: the mean over its tasks, NaN if any task has no finite value.

    Averaging only the surviving tasks would report the easy tasks as the seed's result."""
    vals = [m.get(key, math.nan) if m is not None else math.nan for m in per_task]
    vals = [v if math.isfinite(v) else math.nan for v in vals]  # inf is a divergence too
    return float(np.mean(vals))


def compare_losses(
    tasks_for_seed: Callable[[int], Sequence[Task]],
    factory: Callable,
    losses: dict[str, Callable],
    make_optimizer: Callable,
    *,
    seeds: Sequence[int],
    steps: int,
    batch_size: int | None,
    progress: bool = True,
    vectorised: InnerOptimizer | None = None,
) -> Results:
    """``{loss: {metric: [value per seed]}}``; a seed's value is the mean over its tasks.

    Every loss gets the same metric keys — derived from the task kind
    (`metaloss.metrics.train_result_names`), not from whichever runs succeeded — and
    exactly ``len(seeds)`` values per key. A loss that diverges (NaN/inf training loss) on
    any task of a seed is NaN for that seed, logged with the loss, seed and task; it is
    never dropped, so n stays ``len(seeds)`` and the seeds stay paired across losses.

    With ``vectorised`` (the functional twin of ``make_optimizer``'s optimizer), each loss
    trains all seeds × tasks models as one ``vmap`` (:func:`metaloss.train_many.train_many`);
    a loss that cannot run under ``vmap`` falls back to this loop, with a warning naming it.
    """
    if not seeds:
        raise ValueError("the meta-test needs at least one seed")
    if vectorised is not None:
        return _compare_vectorised(
            tasks_for_seed,
            factory,
            losses,
            make_optimizer,
            vectorised,
            seeds=seeds,
            steps=steps,
            batch_size=batch_size,
            progress=progress,
        )
    results: Results = {}
    bar = tqdm(
        total=len(seeds) * len(losses), desc="meta-test", disable=not progress, mininterval=1.0
    )
    for seed in seeds:
        tasks = list(tasks_for_seed(seed))
        if not results:
            keys = train_result_names(tasks[0].kind)
            results = {name: {k: [] for k in keys} for name in losses}
            _check_contract(losses, tasks[0])
        for name, loss in losses.items():
            bar.set_postfix(loss=name, seed=seed, refresh=False)
            # model init and batch order depend on (seed, task) only: identical for every loss
            per_task = [
                _train_one(
                    task,
                    factory,
                    loss,
                    make_optimizer,
                    steps=steps,
                    batch_size=batch_size,
                    seed=seed * 1000 + i,
                    where=f"loss {name!r} on seed {seed} task {i}",
                )
                for i, task in enumerate(tasks)
            ]
            _record_seed(results[name], keys, name, seed, per_task)
            bar.update()
    bar.close()
    return results


def _check_contract(losses: dict[str, Callable], task: Task) -> None:
    """Every loss returns one value per example, checked on a probe batch before any training
    (the apps check when they build their losses; this covers losses passed in directly)."""
    for name, loss in losses.items():
        check_loss_output(loss, task, name)


def _compare_vectorised(
    tasks_for_seed,
    factory,
    losses,
    make_optimizer,
    inner_opt,
    *,
    seeds,
    steps,
    batch_size,
    progress,
) -> Results:
    per_seed = [list(tasks_for_seed(seed)) for seed in seeds]
    members = [
        (task, seed * 1000 + i)
        for seed, tasks in zip(seeds, per_seed)
        for i, task in enumerate(tasks)
    ]
    keys = train_result_names(per_seed[0][0].kind)
    results: Results = {name: {k: [] for k in keys} for name in losses}
    _check_contract(losses, per_seed[0][0])
    bar = tqdm(total=len(losses), desc="meta-test (vmap)", disable=not progress, mininterval=1.0)
    for name, loss in losses.items():
        bar.set_postfix(loss=name, refresh=False)
        try:
            flat = train_many(
                [t for t, _ in members],
                [s for _, s in members],
                factory,
                loss,
                inner_opt,
                steps=steps,
                batch_size=batch_size,
            )
        except Exception as e:  # e.g. a loss with data-dependent Python control flow
            log.warning(
                "meta-test: loss %r cannot be trained under vmap (%s: %s); falling back to the "
                "per-model loop for it",
                name,
                type(e).__name__,
                str(e).splitlines()[0][:200],
            )
            flat = [
                _train_one(
                    task,
                    factory,
                    loss,
                    make_optimizer,
                    steps=steps,
                    batch_size=batch_size,
                    seed=s,
                    where=f"loss {name!r} task seed {s}",
                )
                for task, s in members
            ]
        pos = 0
        for seed, tasks in zip(seeds, per_seed):
            per_task = flat[pos : pos + len(tasks)]
            pos += len(tasks)
            for i, m in enumerate(per_task):
                if m is None:
                    log.warning(
                        "meta-test: loss %r diverged on seed %d task %d; recorded as NaN",
                        name,
                        seed,
                        i,
                    )
            _record_seed(results[name], keys, name, seed, per_task)
        bar.update()
    bar.close()
    return results


def _record_seed(
    record: dict[str, list[float]],
    keys: list[str],
    name: str,
    seed: int,
    per_task: list[dict[str, float] | None],
) -> None:
    """Append one seed's value (the mean over its tasks, NaN if any diverged) to every metric."""
    for k in keys:
        record[k].append(_seed_value(per_task, k))
    _warn_partial(name, seed, per_task, record)


def _warn_partial(
    name: str, seed: int, per_task: list[dict[str, float] | None], record: dict[str, list[float]]
) -> None:
    bad = [k for k, v in record.items() if math.isnan(v[-1])]
    if not bad:
        return
    failed = sum(m is None for m in per_task)
    if 0 < failed < len(per_task):
        log.warning(
            "meta-test: loss %r seed %d: %d/%d tasks diverged; the seed is recorded as NaN, "
            "not as the mean of the other tasks",
            name,
            seed,
            failed,
            len(per_task),
        )
    elif failed == 0:
        log.warning(
            "meta-test: loss %r seed %d: non-finite %s; recorded as NaN", name, seed, ", ".join(bad)
        )


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test (Welch 1947); NaN if a value is
    NaN or a side has fewer than 2 values. Both sides constant: 0 if the means differ, else 1."""
    from scipy import stats

    xa, xb = np.asarray(a, float), np.asarray(b, float)
    if len(xa) < 2 or len(xb) < 2 or not np.isfinite(xa).all() or not np.isfinite(xb).all():
        return float("nan")
    if xa.std() == 0 and xb.std() == 0:
        return 0.0 if xa.mean() != xb.mean() else 1.0
    return float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Paired t-test of ``a`` against ``b`` (seed i of both shares data and initialisation),
    with the effect size: the mean difference ``a - b``, its ``confidence`` interval
    (Student t, n-1 degrees of freedom) and Cohen's d_z = mean(d) / sd(d).

    Degenerate cases give defined values instead of scipy's NaN and warnings:
    any non-finite value, or n < 2: every statistic NaN (mean difference if n == 1);
    differences all equal (zero variance): p = 1 and d_z = 0 if they are all 0, else d_z =
    ±inf and p = 2 / 2**n, the exact sign-flip (permutation) p-value of n equal differences —
    the t statistic is infinite there, and its p = 0 would call two seeds that differ by the
    same 0.001 "significant"; the interval collapses to the difference.
    """
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    nan = float("nan")
    out = {
        "n": n,
        "mean_difference": nan,
        "ci_low": nan,
        "ci_high": nan,
        "cohens_dz": nan,
        "p_value": nan,
    }
    if n == 0 or not np.isfinite(d).all():
        return out
    mean = float(d.mean())
    out["mean_difference"] = mean
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    # float rounding leaves ~1e-16 spread in differences that are equal on paper
    if sd <= 1e-12 * float(np.abs(d).max()):
        zero = float(np.abs(d).max()) == 0.0
        return {
            **out,
            "ci_low": mean,
            "ci_high": mean,
            "p_value": 1.0 if zero else min(1.0, 2.0 / 2**n),
            "cohens_dz": 0.0 if zero else math.copysign(math.inf, mean),
        }
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = 2 * float(stats.t.sf(abs(mean / se), n - 1))  # = scipy.stats.ttest_rel(a, b).pvalue
    return {
        **out,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "cohens_dz": mean / sd,
        "p_value": p,
    }


def _n_bad(values: Sequence[float]) -> int:
    return int((~np.isfinite(np.asarray(values, float))).sum())


def _finite_mean(values: Sequence[float]) -> float:
    a = np.asarray(values, float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment (Holm, Scand. J. Statist. 1979) of a family of p-values:
    the i-th smallest of k is multiplied by k - i (i from 0), made monotone, capped at 1.
    Rejecting where the adjusted p < alpha controls the family-wise error rate at alpha."""
    order = sorted(p_values, key=p_values.__getitem__)
    out, running, k = {}, 0.0, len(order)
    for i, name in enumerate(order):
        running = max(running, min(1.0, (k - i) * p_values[name]))
        out[name] = running
    return out


VERDICT_RULE = (
    "The reference baseline is the one with the best mean on {select} (the validation "
    "split: chosen before any test value is read), among baselines without NaN. The learned "
    "loss is compared with every such baseline by a paired t-test over seeds; the p-values are "
    "Holm-adjusted over those {k} comparisons, and the verdict is the reference's comparison at "
    "Holm-adjusted p < {alpha}. Holm's procedure keeps the chance of any wrong claim (better or "
    "worse, about any baseline) at most {alpha} when all losses are truly equal; simulated with 4 "
    "baselines and 5 seeds, 'significantly worse' came out 1.4% and 'significantly better' 0.03% "
    "of the time (nominal {half} each)."
)


TIE_DIGITS = 9  # selection means equal to this many decimals are a tie


def choose_reference(selection: dict[str, float], higher: bool) -> str | None:
    """The baseline with the best selection mean; a tie goes to the first in ``selection``'s
    order (the experiment's ``compare`` list). Means are compared rounded to ``TIE_DIGITS``
    decimals: two baselines with the same validation scores must not be told apart by the
    last bit of a float sum (which can differ across machines). None if ``selection`` is
    empty."""
    if not selection:
        return None
    key = {b: round(v, TIE_DIGITS) for b, v in selection.items()}
    return (max if higher else min)(selection, key=key.__getitem__)


def significance(
    results: Results,
    metric: str,
    learned: str = "learned",
    alpha: float = 0.05,
    select_on: str | None = None,
) -> dict:
    """Learned loss vs a reference baseline on ``metric``, the reference decided before any
    test value is read.

    The reference (``best_baseline``) is the baseline with the best mean on ``select_on``,
    by default the validation twin of ``metric`` (``val/acc`` for ``test/acc``) where the
    results have it (a hand-made result without it is selected on ``metric`` itself, and
    ``selected_on`` and the rule say so), among baselines whose values are all finite (a
    baseline that diverged on a seed is never the reference; one finite on ``metric`` but not
    on ``select_on`` stays in the family of comparisons, listed as
    ``unselectable_baselines``). Picking the baseline with the best *test* mean and then
    testing it uncorrected made "significantly worse" come out about three times its nominal
    rate under the null (issue 16).

    Every finite baseline is compared with the learned loss by a paired t-test (seed i of
    every loss shares data and initialisation); the p-values are Holm-adjusted over those k
    comparisons (``pairwise``), and the verdict is the reference's comparison at its adjusted
    p (``p_value_holm``) < ``alpha``. Holm controls the family-wise error at alpha: when all
    losses are equal, the chance of any wrong claim (either direction, any baseline) is at
    most alpha, whatever was selected; per direction it is not proven below alpha / 2, but
    simulated it is (tests/test_comparison_stats.py). Welch's unequal-variance p is reported
    beside it. ``verdict``
    starts with "undefined:" and says why when NaNs, missing baselines or n < 2 leave no answer.
    """
    if learned not in results:
        return {}
    n = len(results[learned].get(metric, ()))
    for name, r in results.items():  # compare_losses guarantees this; hand-made results may not
        if metric not in r or len(r[metric]) != n:
            raise ValueError(
                f"cannot pair seeds on {metric!r}: {name!r} has {len(r.get(metric, ()))} "
                f"values, {learned!r} has {n} (metrics of {name!r}: {sorted(r)})"
            )
    higher = HIGHER_IS_BETTER.get(metric.split("/")[-1], True)
    twin = "val/" + metric.split("/", 1)[-1]
    if select_on is None:
        select_on = twin if all(len(r.get(twin, ())) == n for r in results.values()) else metric
    if HIGHER_IS_BETTER.get(select_on.split("/")[-1], True) != higher:
        raise ValueError(
            f"select_on={select_on!r} and metric={metric!r} rank in opposite directions"
        )
    ours = list(results[learned][metric])
    baselines = {name: list(r[metric]) for name, r in results.items() if name != learned}
    diverged = {name: _n_bad(v) for name, v in baselines.items() if _n_bad(v)}
    # the family: every baseline with a finite value on every seed (a test p-value); the reference
    # among those that also have one on the selection metric
    family = [name for name in baselines if name not in diverged]
    unselectable = [name for name in family if _n_bad(results[name][select_on])]
    selection = {
        name: _finite_mean(results[name][select_on]) for name in family if name not in unselectable
    }
    best = choose_reference(selection, higher)
    theirs = baselines[best] if best else []
    level = 1 - alpha  # the interval excludes 0 exactly when the two-sided p < alpha
    stats_ = paired(ours, theirs, confidence=level) if best else paired([], [])
    raw = {name: paired(ours, baselines[name], confidence=level)["p_value"] for name in family}
    adjusted = (
        holm({k: v for k, v in raw.items() if not math.isnan(v)})
        if not _n_bad(ours) and n >= 2
        else {}
    )
    pairwise: dict[str, dict[str, float | str]] = {}
    for name in family:
        difference = _finite_mean(ours) - _finite_mean(baselines[name])
        p_holm = adjusted.get(name, float("nan"))
        pairwise[name] = {
            "difference": difference,
            "p_value": raw[name],
            "p_value_holm": p_holm,
            "verdict": direction(p_holm, difference, higher, alpha),
        }
    sig = {
        "metric": metric,
        "higher_is_better": higher,
        "n_seeds": n,
        "best_baseline": best,
        "selected_on": select_on,
        "selection_means": selection,
        "unselectable_baselines": unselectable,
        "learned_mean": _finite_mean(ours),
        "learned_n_nan": _n_bad(ours),
        "best_baseline_mean": _finite_mean(theirs) if best else float("nan"),
        "diverged_baselines": diverged,
        "difference": stats_["mean_difference"],
        "ci_low": stats_["ci_low"],
        "ci_high": stats_["ci_high"],
        "ci_level": level,
        "cohens_dz": stats_["cohens_dz"],
        "p_value": stats_["p_value"],
        "p_value_holm": pairwise[best]["p_value_holm"] if best else float("nan"),
        "p_value_welch": welch(ours, theirs) if best else float("nan"),
        "pairwise": pairwise,
        "alpha": alpha,
        "test": PAIRED_TEST + ", Holm-adjusted over the baselines",
        "verdict_rule": VERDICT_RULE.format(
            select=select_on, k=len(family), alpha=alpha, half=f"{alpha / 2:g}"
        )
        + (
            ""
            if select_on != metric
            else " (These results carry no validation values: the reference was "
            "chosen on the test metric itself, which is not a pre-declared choice.)"
        ),
    }
    sig["verdict"] = _verdict(sig, n_baselines=len(baselines))
    return sig


def format_number(x: float | None, spec: str = ".4f") -> str:
    """A statistic as the verdict texts print it: "NaN" for a missing or NaN value; ±inf (the
    d_z of constant differences) prints as inf."""
    return "NaN" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def direction(p: float, difference: float, higher: bool, alpha: float) -> str:
    """The verdict of one comparison: "undefined" (p is NaN), "no significant difference"
    (p >= alpha), else better or worse as the difference and the metric's direction say."""
    if math.isnan(p):
        return "undefined"
    if p >= alpha:
        return "no significant difference"
    return "significantly better" if (difference > 0) == higher else "significantly worse"


def _verdict(sig: dict, n_baselines: int) -> str:
    n, bad = sig["n_seeds"], sig["learned_n_nan"]
    if bad:
        return f"undefined: learned loss diverged on {bad}/{n} seeds"
    if n_baselines == 0:
        return "undefined: no baseline to compare with"
    if sig["best_baseline"] is None:
        if sig.get("unselectable_baselines"):
            return (
                f"undefined: no baseline has finite {sig['selected_on']} values on every seed "
                f"to be chosen as the reference ({', '.join(sig['unselectable_baselines'])} "
                "diverged there)"
            )
        which = ", ".join(f"{k} {v}/{n}" for k, v in sig["diverged_baselines"].items())
        return f"undefined: every baseline diverged on some seed ({which})"
    if n < 2:
        return f"undefined: a paired t-test needs at least 2 seeds, got {n}"
    p = sig["p_value_holm"]
    if math.isnan(
        p
    ):  # not expected once the cases above are excluded; never pass it off as "no difference"
        return "undefined: the paired t-test is undefined on these values"
    return direction(p, sig["difference"], sig["higher_is_better"], sig["alpha"])

"""Repeated meta-training: the learned loss (the *search*) against baselines over meta-training
seeds × test draws, with statistics that respect the design.

A record meta-trains M times (``seed=0 .. M-1``: the search's own randomness) and meta-tests
each learned loss on the same S test draws (``meta_test.seeds``; test draw s is the same data
and initialisation for every loss and every meta-training run). The baselines do not depend on
the meta-training seed, so each has one value per test draw. For one baseline the paired
differences ``d[m, s] = learned[m, s] - baseline[s]`` form an M × S table with crossed random
effects: a meta-training run effect a_m (one search found a better loss than another), a test
draw effect b_s (a draw on which the learned loss does better than the baseline, shared by
every run) and a residual e_ms. The mean difference d̄ has variance
σ_a²/M + σ_b²/S + σ_e²/(MS). From the two-way table without replication,
E[MS_run] = S σ_a² + σ_e² and E[MS_draw] = M σ_b² + σ_e², so (MS_run + MS_draw) / (MS)
over-estimates it by σ_e²/(MS): a conservative standard error, with Satterthwaite's
(1946) degrees of freedom. Pooling the M × S values as MS independent pairs would count every
test draw M times and ignore the spread between searches (anti-conservative); averaging over
runs first would ignore the run effect. With M = 1 the test is exactly the paired t-test of
:func:`metaloss.metatest.paired`.

The reference baseline is chosen on validation as in :func:`metaloss.metatest.significance`,
the p-values are Holm-adjusted over the baselines, and the reference's adjusted p decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from metaloss.metatest import (
    Results,
    choose_reference,
    direction,
    format_number,
    holm,
    significance,
)
from metaloss.metrics import HIGHER_IS_BETTER

CROSSED_TEST = (
    "t-test on the mean paired difference over meta-training runs x test draws (crossed random "
    "effects, conservative standard error (MS_run + MS_draw) / (M S), Satterthwaite degrees of "
    "freedom), Holm-adjusted over the baselines"
)

NESTED_RULE = (
    "The reference baseline is the one with the best mean on {select} (the validation split, "
    "averaged over the test draws: chosen before any test value is read), among baselines without "
    "NaN. Each baseline is compared with the learned loss over {m} meta-training run(s) x {s} test "
    "draw(s) by a t-test on the mean paired difference whose standard error counts both the spread "
    "between meta-training runs and the spread between test draws (crossed random effects, "
    "Satterthwaite df); the p-values are Holm-adjusted over those {k} comparisons, and the verdict "
    "is the reference's comparison at Holm-adjusted p < {alpha}. It is a claim about the search "
    "(what meta-training with this config yields on average), not about one learned loss; each "
    "run's own verdict is under per_run.{one}"
)


def crossed(d: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean of an M × S table of paired differences (rows: meta-training runs, columns: test
    draws shared by every row), its ``confidence`` interval and two-sided p-value against 0,
    with the conservative crossed-effects standard error described in the module docstring.

    Any non-finite cell makes every statistic NaN (the mean too). Zero estimated variance:
    p = 1 if every difference is 0, else the exact sign-flip p over the test draws, 2 / 2**S
    (as :func:`metaloss.metatest.paired` does for one run).
    """
    from scipy import stats

    d = np.asarray(d, float)
    if d.ndim != 2:
        raise ValueError(f"crossed() takes an M x S table of differences, got shape {d.shape}")
    m, s = d.shape
    nan = float("nan")
    out = {
        "n_runs": m,
        "n_draws": s,
        "mean_difference": nan,
        "ci_low": nan,
        "ci_high": nan,
        "se": nan,
        "df": nan,
        "p_value": nan,
        "ms_run": nan,
        "ms_draw": nan,
        "effect_size": nan,
    }
    if d.size == 0 or not np.isfinite(d).all():
        return out
    mean = float(d.mean())
    out["mean_difference"] = mean
    terms = []  # (mean square, its degrees of freedom)
    if m > 1:
        out["ms_run"] = s * float(((d.mean(axis=1) - mean) ** 2).sum()) / (m - 1)
        terms.append((out["ms_run"], m - 1))
    if s > 1:
        out["ms_draw"] = m * float(((d.mean(axis=0) - mean) ** 2).sum()) / (s - 1)
        terms.append((out["ms_draw"], s - 1))
    if not terms:  # one cell
        return out
    spread = float(np.abs(d).max())
    if float(np.ptp(d)) <= 1e-12 * spread:  # equal differences everywhere (float rounding aside)
        zero = spread == 0.0
        return {
            **out,
            "ci_low": mean,
            "ci_high": mean,
            "se": 0.0,
            "p_value": 1.0 if zero else min(1.0, 2.0 / 2**s),
            "effect_size": 0.0 if zero else math.copysign(math.inf, mean),
        }
    total = sum(ms for ms, _ in terms)
    if total <= 1e-24 * spread**2 and m > 1 and s > 1:
        # rows and columns have equal means but the cells differ (an interaction only): the
        # residual mean square, E = σ_e², is then the only estimate of the error left
        resid = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + mean
        terms = [(float((resid**2).sum()) / ((m - 1) * (s - 1)), (m - 1) * (s - 1))]
        total = terms[0][0]
    se = math.sqrt(total / (m * s))
    df = total**2 / sum(ms**2 / k for ms, k in terms if ms > 0)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    sd = float(d.std(ddof=1)) if d.size > 1 else nan
    return {
        **out,
        "se": se,
        "df": df,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "p_value": 2 * float(stats.t.sf(abs(mean / se), df)),
        "effect_size": mean / sd if sd and math.isfinite(sd) else nan,
    }


def _mean(values) -> float:
    a = np.asarray(values, float)
    return float(a.mean()) if a.size and np.isfinite(a).all() else float("nan")


def nested_significance(
    runs: Sequence[Results],
    metric: str,
    learned: str = "learned",
    alpha: float = 0.05,
    select_on: str | None = None,
) -> dict:
    """The search's verdict from M meta-training runs' meta-tests (``runs[m]``: one run's
    ``comparison.json`` results, every run on the same test draws).

    The baselines' values must not depend on the run (they train the same way on the same
    draws); their largest disagreement between runs is reported (``baseline_spread_across_runs``,
    0 on one machine) and each baseline's value per draw is the mean over runs. Returns the keys
    of :func:`metaloss.metatest.significance` (``n_seeds`` counts test draws) plus
    ``n_meta_seeds``, ``learned_run_means`` (each run's mean over draws),
    ``learned_between_runs_sd``, ``per_run`` (each run's own verdict) and the crossed test's
    ``se`` and ``df``.
    """
    if not runs:
        raise ValueError("nested_significance needs at least one meta-training run")
    names = list(runs[0])
    if learned not in names:
        raise ValueError(f"no {learned!r} loss in the first run (losses: {names})")
    n = len(runs[0][learned].get(metric, ()))
    for i, r in enumerate(runs):
        if set(r) != set(names):
            raise ValueError(
                f"run {i} has losses {sorted(r)}, run 0 has {sorted(names)}: not one record"
            )
        for name, res in r.items():
            if len(res.get(metric, ())) != n:
                raise ValueError(
                    f"cannot pair test draws on {metric!r}: run {i}'s {name!r} has "
                    f"{len(res.get(metric, ()))} values, run 0's {learned!r} has {n}"
                )
    higher = HIGHER_IS_BETTER.get(metric.split("/")[-1], True)
    twin = "val/" + metric.split("/", 1)[-1]
    if select_on is None:
        select_on = (
            twin if all(len(res.get(twin, ())) == n for r in runs for res in r.values()) else metric
        )
    ours = np.array([r[learned][metric] for r in runs], float)  # M x S
    baseline_names = [b for b in names if b != learned]

    def per_draw(name: str, key: str) -> np.ndarray:
        return np.array([r[name][key] for r in runs], float).mean(axis=0)  # NaN if any run's is

    spread = max(
        (
            float(
                np.nanmax(
                    np.abs(
                        np.array([r[b][metric] for r in runs], float)
                        - np.array(runs[0][b][metric], float)
                    ),
                    initial=0.0,
                )
            )
            for b in baseline_names
        ),
        default=0.0,
    )
    baselines = {b: per_draw(b, metric) for b in baseline_names}
    diverged = {
        b: int((~np.isfinite(v)).sum()) for b, v in baselines.items() if not np.isfinite(v).all()
    }
    family = [b for b in baseline_names if b not in diverged]
    unselectable = [b for b in family if not np.isfinite(per_draw(b, select_on)).all()]
    selection = {b: _mean(per_draw(b, select_on)) for b in family if b not in unselectable}
    best = choose_reference(selection, higher)
    level = 1 - alpha
    tests = {b: crossed(ours - baselines[b][None, :], confidence=level) for b in family}
    learned_bad = int((~np.isfinite(ours)).sum())
    adjusted = (
        holm({b: t["p_value"] for b, t in tests.items() if not math.isnan(t["p_value"])})
        if not learned_bad
        else {}
    )
    pairwise: dict[str, dict] = {
        b: {
            "difference": t["mean_difference"],
            "p_value": t["p_value"],
            "p_value_holm": adjusted.get(b, float("nan")),
        }
        for b, t in tests.items()
    }
    for row in pairwise.values():
        row["verdict"] = direction(row["p_value_holm"], row["difference"], higher, alpha)
    ref = tests[best] if best else crossed(np.empty((0, 0)))
    run_means = [_mean(row) for row in ours]
    per_run = [
        significance(r, metric, learned=learned, alpha=alpha, select_on=select_on) for r in runs
    ]
    sig = {
        "metric": metric,
        "higher_is_better": higher,
        "n_seeds": n,
        "n_meta_seeds": len(runs),
        "best_baseline": best,
        "selected_on": select_on,
        "selection_means": selection,
        "unselectable_baselines": unselectable,
        "learned_mean": _mean(ours),
        "learned_n_nan": learned_bad,
        "learned_run_means": run_means,
        "learned_between_runs_sd": float(np.std(run_means, ddof=1))
        if len(runs) > 1
        else float("nan"),
        "best_baseline_mean": _mean(baselines[best]) if best else float("nan"),
        "diverged_baselines": diverged,
        "baseline_spread_across_runs": spread,
        "difference": ref["mean_difference"],
        "ci_low": ref["ci_low"],
        "ci_high": ref["ci_high"],
        "ci_level": level,
        "se": ref["se"],
        "df": ref["df"],
        "cohens_dz": ref["effect_size"],  # the mean over the sd of all M x S cells
        "p_value": ref["p_value"],
        "p_value_holm": pairwise[best]["p_value_holm"] if best else float("nan"),
        "p_value_welch": float("nan"),
        "pairwise": pairwise,
        "alpha": alpha,
        "test": CROSSED_TEST,
        "verdict_rule": NESTED_RULE.format(
            select=select_on,
            m=len(runs),
            s=n,
            k=len(family),
            alpha=alpha,
            one=""
            if len(runs) > 1
            else " With one meta-training run the "
            "spread between searches is unknown: the verdict is about that one "
            "learned loss.",
        ),
        "per_run": [
            {k: s.get(k) for k in ("learned_mean", "best_baseline", "p_value_holm", "verdict")}
            for s in per_run
        ],
    }
    sig["verdict"] = _verdict(sig, len(baseline_names))
    return sig


def _verdict(sig: dict, n_baselines: int) -> str:
    m, n, bad = sig["n_meta_seeds"], sig["n_seeds"], sig["learned_n_nan"]
    if bad:
        return f"undefined: learned loss diverged on {bad}/{m * n} (run, draw) pairs"
    if n_baselines == 0:
        return "undefined: no baseline to compare with"
    if sig["best_baseline"] is None:
        return (
            "undefined: no baseline has finite values on every draw to be chosen as the reference"
        )
    if n < 2:
        return (
            f"undefined: the test needs at least 2 test draws, got {n} "
            "(the draw-to-draw spread is unknown)"
        )
    p = sig["p_value_holm"]
    if math.isnan(p):
        return "undefined: the test is undefined on these values"
    return direction(p, sig["difference"], sig["higher_is_better"], sig["alpha"])


def _floats(values) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def combine(
    comparisons: Sequence[dict], meta_seeds: Sequence[int], alpha: float | None = None
) -> dict:
    """One record from M meta-training runs' ``comparison.json`` (read as data): the same task,
    metric, test seeds, losses and protocol in each, or a ValueError naming what differs.
    Returns the nested record (``nested_comparison.json``): each run's learned values, the
    baselines' values per draw, the nested verdict and the protocol."""
    if len(comparisons) != len(meta_seeds) or not comparisons:
        raise ValueError(f"{len(comparisons)} comparisons for meta-seeds {list(meta_seeds)}")
    if len(set(meta_seeds)) != len(meta_seeds):
        raise ValueError(f"meta-seeds must be distinct meta-training runs, got {list(meta_seeds)}")
    first = comparisons[0]
    for key in ("task", "metric", "seeds", "protocol"):
        for seed, c in zip(meta_seeds, comparisons):
            if c.get(key) != first.get(key):
                raise ValueError(
                    f"meta-seed {seed}'s comparison has {key} = {c.get(key)!r}, meta-seed "
                    f"{meta_seeds[0]}'s {first.get(key)!r}: not one record"
                )
    runs = [
        {
            loss: {k: _floats(v) for k, v in metrics.items()}
            for loss, metrics in c["results"].items()
        }
        for c in comparisons
    ]
    a = float(alpha if alpha is not None else (first.get("significance") or {}).get("alpha", 0.05))
    sig = nested_significance(runs, first["metric"], alpha=a)
    return {
        "task": first["task"],
        "metric": first["metric"],
        "meta_seeds": list(meta_seeds),
        "seeds": first["seeds"],
        "protocol": first["protocol"],
        "learned": {k: [r["learned"][k] for r in runs] for k in runs[0]["learned"]},
        "baselines": {
            b: {k: list(np.array([r[b][k] for r in runs], float).mean(axis=0)) for k in runs[0][b]}
            for b in runs[0]
            if b != "learned"
        },
        # every run's own values, baselines included: what the verdict is decided from
        "runs": runs,
        "hyperparameters": [c.get("hyperparameters") for c in comparisons],
        "significance": {**sig, "meta_seeds": list(meta_seeds)},
        "null_means": "NaN: the loss diverged on that draw, or the statistic is undefined",
    }


def format_nested(record: dict) -> str:
    """Markdown: one row per meta-training run of the learned loss, the learned loss over all
    runs (its ± is the spread between runs' means), then each baseline, on the record's metric
    and its validation twin; then the nested verdict."""
    sig = record["significance"]
    metric = record["metric"]
    keys = [k for k in (metric, sig.get("selected_on")) if k]
    keys = list(dict.fromkeys(keys))

    def cell(values) -> str:
        a = np.asarray(values, float)
        ok = a[np.isfinite(a)]
        text = (
            "NaN"
            if not len(ok)
            else f"{ok.mean():.4f} ± {ok.std(ddof=1) if len(ok) > 1 else 0.0:.4f}"
        )
        return text + (f" ({len(a) - len(ok)}/{len(a)} NaN)" if len(ok) < len(a) else "")

    lines = ["| loss | runs × draws | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for i, seed in enumerate(record["meta_seeds"]):
        lines.append(
            f"| learned, meta-seed {seed} | 1 × {len(record['seeds'])} | "
            + " | ".join(cell(record["learned"][k][i]) for k in keys)
            + " |"
        )
    m = len(record["meta_seeds"])
    lines.append(
        f"| **learned, all runs** (± between runs) | {m} × {len(record['seeds'])} | "
        + " | ".join(cell([_mean(r) for r in record["learned"][k]]) for k in keys)
        + " |"
    )
    for b, metrics in record["baselines"].items():
        lines.append(
            f"| {b} | – × {len(record['seeds'])} | "
            + " | ".join(cell(metrics[k]) for k in keys)
            + " |"
        )
    return "\n".join(lines) + "\n\n" + format_nested_verdict(sig)


def format_nested_verdict(sig: dict) -> str:
    level = f"{100 * sig['ci_level']:.0f}%"
    head = (
        f"search ({sig['n_meta_seeds']} meta-training runs × {sig['n_seeds']} test draws) "
        f"vs reference baseline ({sig['best_baseline'] or 'none without NaN'}), "
        f"chosen on {sig['selected_on']} before testing, on {sig['metric']}: "
        f"{format_number(sig['learned_mean'])} vs {format_number(sig['best_baseline_mean'])}; "
        f"difference {format_number(sig['difference'])} "
        f"[{level} CI {format_number(sig['ci_low'])}, {format_number(sig['ci_high'])}], "
        f"between-runs sd {format_number(sig['learned_between_runs_sd'])}; "
        f"p = {format_number(sig['p_value'], '.3g')} "
        f"(df {format_number(sig['df'], '.1f')}), "
        f"Holm-adjusted over {len(sig['pairwise'])} baseline(s) "
        f"p = {format_number(sig['p_value_holm'], '.3g')} -> {sig['verdict']}"
    )
    rows = [
        f"  vs {b}: difference {format_number(r['difference'])}, "
        f"p = {format_number(r['p_value'], '.3g')}, Holm p = "
        f"{format_number(r['p_value_holm'], '.3g')} -> {r['verdict']}"
        for b, r in sig["pairwise"].items()
    ]
    seeds = sig.get("meta_seeds") or list(range(len(sig["per_run"])))
    runs = [
        f"  meta-seed {m}: learned {format_number(r['learned_mean'])}, "
        f"vs {r['best_baseline']} Holm p = "
        f"{format_number(r['p_value_holm'], '.3g')} -> {r['verdict']}"
        for m, r in zip(seeds, sig["per_run"])
    ]
    return (
        head
        + "\nevery baseline:\n"
        + "\n".join(rows)
        + "\neach meta-training run alone (paired t over its draws):\n"
        + "\n".join(runs)
    )

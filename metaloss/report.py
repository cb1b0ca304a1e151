"""Tables and plots from finished runs: ``metrics.json`` of `metaloss-train` multiruns and
``comparison.json`` of meta-tests. Library code: returns data, writes files, never logs.

NaN (a diverged run) is a value, not a gap: statistics use the finite values and say how
many were NaN. JSON has no NaN, so result files store non-finite numbers as ``null``
(`jsonable`) and `collect` reads ``null`` (and Python's non-standard ``NaN``) back as NaN.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metaloss import keys
from metaloss.metrics import HIGHER_IS_BETTER
from metaloss.runs import MAX_NESTING, nesting_depth

# Overrides that never define a group: the seed (a group's members differ in it) and what
# only changes how a run is run or shown. Matched on the whole key or a dotted prefix: `seeds=3`
# (a 3-seed run) is a setting.
IGNORED = keys.REPORT_IGNORED  # the one table, metaloss.keys


def _seed(run_dir: Path) -> str | None:
    """The ``seed=`` a Hydra run was launched with (None: not recorded)."""
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    for o in yaml.safe_load(f.read_text()) or []:
        if str(o).lstrip("+~").startswith("seed="):
            return str(o).split("=", 1)[1]
    return None


def _overrides(run_dir: Path) -> list[str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    out = []
    for o in yaml.safe_load(f.read_text()) or []:
        key = o.lstrip("+~").split("=", 1)[0]
        if not any(key == k or key.startswith(k + ".") for k in IGNORED):
            out.append(o)
    return out


def jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) as None, so ``json.dumps(...,
    allow_nan=False)`` succeeds: strict JSON readers (jq, JavaScript) reject ``NaN``."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _number(v: Any) -> float:
    return float("nan") if v is None else float(v)


class UnreadableResult(ValueError):
    """A metrics.json / comparison.json that is not a metaloss result."""


def _value_problem(v: Any) -> bool:
    """Not a result value: a number (bool is not one) or null (NaN: diverged)."""
    return not (v is None or (isinstance(v, int | float) and not isinstance(v, bool)))


def _code_keys(node: Any, where: str) -> list[str]:
    """Keys that name code for Hydra to call (``_target_``, ``_partial_``, ...): a result file
    is data, so none may appear anywhere in it."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and k.startswith("_") and k.endswith("_"):
                out.append(key)
            out += _code_keys(v, key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _code_keys(v, f"{where}[{i}]")
    return out


def _metrics_problems(metrics: Any, where: str, per_seed: bool) -> list[str]:
    if not isinstance(metrics, dict):
        return [
            f"{where} = {metrics!r:.80}: must be a mapping "
            f"{{metric: {'[values]' if per_seed else 'value'}}}"
        ]
    out = []
    for k, v in metrics.items():
        if per_seed and not (isinstance(v, list) and not any(map(_value_problem, v))):
            out.append(f"{where}.{k} = {v!r:.80}: must be a list of numbers or null (one per seed)")
        elif not per_seed and _value_problem(v):
            out.append(f"{where}.{k} = {v!r:.80}: must be a number or null")
    return out


def _read(f: Path) -> dict:
    """A result file read as data (nothing in it is instantiated or called), refused unless
    every value read is a number or null, naming the file and the key."""
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested past json's depth
        raise UnreadableResult(
            f"{f}: not readable JSON ({e}); delete or fix it, or report a subdirectory"
        ) from e
    if nesting_depth(rec) > MAX_NESTING:
        raise UnreadableResult(
            f"{f}: nested deeper than {MAX_NESTING} levels, which no metaloss result is"
        )
    key = (
        "results"
        if f.name == "comparison.json"
        else ("runs" if isinstance(rec, dict) and "runs" in rec else "metrics")
    )
    if not isinstance(rec, dict) or not isinstance(rec.get(key), dict | list):
        raise UnreadableResult(f"{f}: not a metaloss {f.name} (no {key!r} entry)")
    found = [
        f"{k}: names code to call; a result file holds values only" for k in _code_keys(rec, "")
    ]
    if key == "results":
        if not isinstance(rec["results"], dict):
            found.append("results: must be a mapping {loss: {metric: [values]}}")
        else:
            for loss, metrics in rec["results"].items():
                found += _metrics_problems(metrics, f"results.{loss}", per_seed=True)
    elif key == "runs":
        for i, r in enumerate(rec["runs"]) if isinstance(rec["runs"], list) else ():
            found += (
                _metrics_problems(r.get("metrics"), f"runs[{i}].metrics", per_seed=False)
                if isinstance(r, dict)
                else [f"runs[{i}]: must be a mapping with 'metrics'"]
            )
        if not isinstance(rec["runs"], list):
            found.append("runs: must be a list of {metrics: {...}}")
    else:
        found += _metrics_problems(rec["metrics"], "metrics", per_seed=False)
    if found:
        raise UnreadableResult(
            f"{f}: not a valid metaloss {f.name} (nothing was reported):\n  " + "\n  ".join(found)
        )
    return rec


def _read_fewshot(f: Path) -> dict:
    """A `metaloss-fewshot` result.json as a meta-test record: its inner loss's meta-test
    scores, one per episode (``{"results": {loss: {metric: [per episode]}}}``), refused unless
    it holds what such a file holds (naming the file and the key)."""
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UnreadableResult(f"{f}: not readable JSON ({e})") from e
    if nesting_depth(rec) > MAX_NESTING:
        raise UnreadableResult(f"{f}: nested deeper than {MAX_NESTING} levels")
    if not isinstance(rec, dict) or not all(k in rec for k in ("loss", "metric", "per_episode")):
        raise UnreadableResult(
            f"{f}: not a metaloss-fewshot result.json (loss, metric, per_episode)"
        )
    # only loss, metric and per_episode are read (the run's settings beside them are not)
    found = []
    if not isinstance(rec["loss"], str) or not isinstance(rec["metric"], str):
        found.append("loss and metric: must be names")
    else:
        found += _metrics_problems({rec["metric"]: rec["per_episode"]}, "", per_seed=True)
    if found:
        raise UnreadableResult(
            f"{f}: not a valid metaloss-fewshot result.json (nothing was reported):\n  "
            + "\n  ".join(found)
        )
    n = len(rec["per_episode"])
    return {"results": {rec["loss"]: {rec["metric"]: rec["per_episode"]}}, "seeds": list(range(n))}


def _comparisons(root: Path) -> list[tuple[Path, dict, list[str]]]:
    """Every meta-test under ``root``: comparison.json files, and metaloss-fewshot result.json
    files (their episodes are the test seeds)."""
    out = [(f, _read(f), _overrides(f.parent)) for f in sorted(root.rglob("comparison.json"))]
    out += [
        (f, _read_fewshot(f), _overrides(f.parent))
        for f in sorted(root.rglob("result.json"))
        if (f.parent / "meta.pt").is_file() or (f.parent / ".hydra").is_dir()
    ]
    return out


def collect(root: str | Path) -> dict[str, dict[str, list[float]]]:
    """``{group: {metric: [value per seed/run]}}`` from every result file under ``root``.

    A `metrics.json` run is grouped by the Hydra overrides that vary across the runs
    found, other than the seed (e.g. ``loss=mse``); a `comparison.json` by loss name.
    ``null`` values (diverged runs) come back as NaN.

    Values are independent units. A meta-test's seeds are, within its run; but several
    meta-tests in one group (meta-training runs that differ only in ``seed=``) test their
    losses on the same test seeds, so each run counts once, with its mean over its test seeds
    (NaN if any seed diverged): n is the number of meta-training runs, and the spread is the
    spread across them (5 runs x 5 test seeds is n = 5, not 25).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    runs = [(f, _read(f), _overrides(f.parent)) for f in sorted(root.rglob("metrics.json"))]
    common = set.intersection(*(set(o) for _, _, o in runs)) if runs else set()
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f, rec, overrides in runs:
        # a debug run is always marked, even when every run found is one
        label = (
            ",".join(o for o in overrides if o not in common or o.startswith("debug="))
            or rec.get("loss")
            or f.parent.name
        )
        # `metaloss-train seeds=N` writes one entry per seed under "runs"
        for metrics in [r["metrics"] for r in rec["runs"]] if "runs" in rec else [rec["metrics"]]:
            for k, v in metrics.items():
                groups[label][k].append(_number(v))
    # Meta-tests of different runs (another loss family, task, lr...) are kept apart: a row
    # is "<overrides that vary> | <loss>", as for metrics.json runs.
    comps = _comparisons(root)
    common = set.intersection(*(set(o) for _, _, o in comps)) if comps else set()
    varying_of = {}
    for f, _, overrides in comps:
        varying = ",".join(o for o in overrides if o not in common or o.startswith("debug="))
        if (
            len(comps) > 1
            and not varying
            and not (f.parent / ".hydra" / "overrides.yaml").is_file()
        ):
            varying = str(f.parent.relative_to(root))  # no overrides recorded: the run's directory
        varying_of[f] = varying
    # runs pooled under one label must be distinct meta-training runs (distinct seed=); reruns
    # of one seed, or runs whose seed is not recorded, are kept apart by directory
    by_label: dict[str, list[Path]] = defaultdict(list)
    for f in varying_of:
        by_label[varying_of[f]].append(f)
    for files in by_label.values():
        seeds = [_seed(f.parent) for f in files]
        if len(files) > 1 and (None in seeds or len(set(seeds)) < len(seeds)):
            for f in files:
                varying_of[f] = ",".join(
                    x for x in (varying_of[f], str(f.parent.relative_to(root))) if x
                )
    nested: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for f, rec, _ in comps:
        for loss, metrics in rec["results"].items():
            label = f"{varying_of[f]} | {loss}" if varying_of[f] else loss
            for k, values in metrics.items():
                nested[label][k].append([_number(v) for v in values])
    for label, metrics in nested.items():
        for k, runs_ in metrics.items():
            groups[label][k].extend(
                runs_[0] if len(runs_) == 1 else [float(np.mean(r)) for r in runs_]
            )
    if not groups:
        raise FileNotFoundError(f"no metrics.json, comparison.json or result.json under {root}")
    return {g: dict(m) for g, m in groups.items()}


def summarize(groups: dict[str, dict[str, list[float]]], prefix: str = "test/") -> dict:
    """Per group and metric starting with ``prefix``: ``mean`` and ``std`` (ddof=1) of the
    finite values, ``n`` (all values, NaN included) and ``n_nan`` (non-finite values).

    ``std`` is 0 for one finite value; ``mean`` and ``std`` are NaN when none is finite."""
    out: dict = {}
    for g, metrics in groups.items():
        out[g] = {}
        for k, vals in metrics.items():
            if not k.startswith(prefix):
                continue
            a = np.asarray(vals, dtype=float)
            ok = a[np.isfinite(a)]
            out[g][k] = {
                "mean": float(ok.mean()) if len(ok) else float("nan"),
                "std": float(ok.std(ddof=1)) if len(ok) > 1 else (0.0 if len(ok) else float("nan")),
                "n": len(a),
                "n_nan": len(a) - len(ok),
            }
    return out


def _complete(s: dict) -> bool:
    """A summary cell that may be ranked: no NaN among its values."""
    return s.get("n_nan", 0) == 0 and math.isfinite(s["mean"])


def _cell(s: dict) -> str:
    if not math.isfinite(s["mean"]):
        text = "NaN"
    else:
        text = f"{s['mean']:.4f} ± {s['std']:.4f}"
    return text + (f" ({s['n_nan']}/{s['n']} NaN)" if s.get("n_nan") else "")


def format_table(summary: dict) -> str:
    """Markdown table, one row per group; cells read "mean ± std", plus "(k/n NaN)" where
    k of the n values diverged. The best mean per metric is in bold, chosen only among
    groups without NaN: a mean over the surviving seeds flatters a loss that diverged."""
    metrics = sorted({k for g in summary.values() for k in g})
    best = {}
    for k in metrics:
        higher = HIGHER_IS_BETTER.get(k.split("/")[-1], True)
        means = {g: s[k]["mean"] for g, s in summary.items() if k in s and _complete(s[k])}
        best[k] = (max if higher else min)(means, key=means.__getitem__) if means else None
    head = "| run | n | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for g, s in summary.items():
        n = max((v["n"] for v in s.values()), default=0)
        cells = []
        for k in metrics:
            if k not in s:
                cells.append("")
                continue
            cell = _cell(s[k])
            cells.append(f"**{cell}**" if best[k] == g else cell)
        lines.append(f"| {escape_markdown(g)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> Path:
    """Bar chart with ±1 std error bars, one panel per metric. A group with no finite
    value gets no bar but a "NaN" mark; one with some NaN is labelled "k/n NaN"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for g in summary.values() for k in g})
    cols = max(1, min(3, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    groups = list(summary)
    for ax, k in zip(axes.flat, metrics):
        cells = [summary[g].get(k) for g in groups]
        ok = [i for i, c in enumerate(cells) if c is not None and math.isfinite(c["mean"])]
        if ok:  # a NaN bar would just vanish: draw the finite ones, mark the others below
            ax.bar(
                ok,
                [cells[i]["mean"] for i in ok],
                yerr=[cells[i]["std"] for i in ok],
                capsize=3,
                color="tab:blue",
                alpha=0.8,
            )
        for i, c in enumerate(cells):
            if c is not None and c.get("n_nan"):
                label = "NaN" if i not in ok else f"{c['n_nan']}/{c['n']} NaN"
                ax.annotate(
                    label,
                    (i, 0),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="tab:red",
                    rotation=90,
                )
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(k)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_seed_differences(
    recorded: dict, again: dict, metric: str | None = None
) -> dict[str, list[float]]:
    """Per loss of ``recorded`` (a comparison.json), ``|recorded - again|`` seed by seed on
    ``metric`` (default: the recorded one). Both NaN (``null``) is 0: the same divergence;
    NaN on one side only, a loss missing from ``again`` or another number of seeds is inf."""
    metric = metric or recorded["metric"]
    out: dict[str, list[float]] = {}
    for loss, per_metric in recorded["results"].items():
        old, new = per_metric.get(metric), again.get("results", {}).get(loss, {}).get(metric)
        if old is None or new is None or len(new) != len(old):
            out[loss] = [math.inf]
            continue
        diffs = []
        for a, b in zip(map(_number, old), map(_number, new)):
            if math.isnan(a) or math.isnan(b):
                diffs.append(0.0 if math.isnan(a) and math.isnan(b) else math.inf)
            else:
                diffs.append(abs(a - b))
        out[loss] = diffs
    return out


# ---------------------------------------------------------------- the tidy table
#
# One row per value: (group, loss, meta_seed, seed, metric, value, status). ``group`` is the
# label :func:`collect` gives a run's settings that vary, ``loss`` the loss (a meta-test's
# losses, or a metaloss-train run's), ``meta_seed`` the ``seed=`` a meta-training run was
# launched with (None for metaloss-train runs), ``seed`` the test seed (a meta-test's draw, or
# the run's seed), ``status`` ``ok``, ``diverged`` (the value is NaN) or ``failed`` (a run
# directory with no result file at all: the run died before writing one). Every view below is
# a group-by of this table; none reads the files again.

TIDY_COLUMNS = ["group", "loss", "meta_seed", "seed", "metric", "value", "status"]


def _run_dirs_without_results(root: Path) -> list[Path]:
    """Hydra run directories (a ``.hydra/config.yaml``) under ``root`` holding no result file:
    runs that failed or were killed before writing one."""
    out = []
    for cfg in sorted(root.rglob(".hydra/config.yaml")):
        run = cfg.parent.parent
        if not any((run / n).is_file() for n in ("metrics.json", "comparison.json", "result.json")):
            out.append(run)
    return out


def tidy(root: str | Path):
    """The tidy table of every result under ``root`` (see the comment above): a pandas
    ``DataFrame`` with :data:`TIDY_COLUMNS`. Malformed files are refused as by
    :func:`collect` (naming the file), before anything is returned."""
    import pandas as pd

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    rows: list[dict] = []
    train = [(f, _read(f), _overrides(f.parent)) for f in sorted(root.rglob("metrics.json"))]
    comps = _comparisons(root)
    failed = _run_dirs_without_results(root)
    all_overrides = [o for _, _, o in train + comps] + [_overrides(d) for d in failed]
    common = set.intersection(*(set(o) for o in all_overrides)) if all_overrides else set()

    def group_of(overrides: list[str], fallback: str) -> str:
        varying = [o for o in overrides if o not in common or o.startswith("debug=")]
        varying = [o for o in varying if not o.lstrip("+~").startswith("loss=")]
        return ",".join(varying) or fallback

    def loss_of(overrides: list[str], rec: dict | None) -> str:
        for o in overrides:
            if o.lstrip("+~").startswith(("loss=", "fewshot_loss=")):
                return o.split("=", 1)[1]
        return str((rec or {}).get("loss") or "?")

    def status(v: float) -> str:
        return "ok" if math.isfinite(v) else "diverged"

    for f, rec, overrides in train:
        seed = _seed(f.parent)
        entries = rec["runs"] if "runs" in rec else [{"metrics": rec["metrics"]}]
        for i, r in enumerate(entries):
            for k, v in r["metrics"].items():
                value = _number(v)
                rows.append(
                    dict(
                        group=group_of(overrides, "-"),
                        loss=loss_of(overrides, rec),
                        meta_seed=None,
                        seed=r.get("seed", i if "runs" in rec else seed),
                        metric=k,
                        value=value,
                        status=status(value),
                    )
                )
    for f, rec, overrides in comps:
        meta_seed = _seed(f.parent)
        seeds = rec.get("seeds") or []
        for loss, metrics in rec["results"].items():
            for k, values in metrics.items():
                for i, v in enumerate(values):
                    value = _number(v)
                    rows.append(
                        dict(
                            group=group_of(
                                [o for o in overrides if not o.startswith("seed=")], "-"
                            ),
                            loss=loss,
                            meta_seed=meta_seed,
                            seed=seeds[i] if i < len(seeds) else i,
                            metric=k,
                            value=value,
                            status=status(value),
                        )
                    )
    for d in failed:
        overrides = _overrides(d)
        rows.append(
            dict(
                group=group_of([o for o in overrides if not o.startswith("seed=")], "-"),
                loss=loss_of(overrides, None),
                meta_seed=None,
                seed=_seed(d),
                metric=None,
                value=float("nan"),
                status="failed",
            )
        )
    if not rows:
        raise FileNotFoundError(f"no metrics.json, comparison.json or result.json under {root}")
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def splits(table) -> list[str]:
    """The metric namespaces present (``test``, ``val``, ``train``), for ``--split``."""
    names = table["metric"].dropna().astype(str)
    return sorted({m.split("/", 1)[0] for m in names if "/" in m})


def per_meta_seed(table, split: str = "test"):
    """One row per (group, loss, meta-seed, metric): mean and std over the test seeds, ``n``
    values, how many diverged. metaloss-train runs (no meta-seed) form one row per loss."""
    t = table[table["metric"].astype(str).str.startswith(f"{split}/")].copy()
    t["meta_seed"] = t["meta_seed"].fillna("-")
    g = t.groupby(["group", "loss", "meta_seed", "metric"], sort=False)["value"]
    out = g.agg(
        mean="mean",
        std="std",
        n="size",
        n_diverged=lambda v: int((~v.map(math.isfinite)).sum()),
    )
    return out.reset_index()


def pooled(table, split: str = "test"):
    """One row per (group, loss, metric) that respects the nesting: the mean of the
    meta-seeds' means, and the std **across meta-seeds** (n = the number of meta-training runs:
    test seeds within a run share its learned loss, so they are not independent units). A run
    with a diverged seed counts in ``n`` and ``n_diverged`` but not in the mean.
    A row of metaloss-train runs (no meta-seed) pools its seeds directly. ``failed``: runs
    under the group and loss that left no result; ``short``: fewer values than the most any
    row of the group has (some seeds missing)."""
    pms = per_meta_seed(table, split)
    rows = []
    failed = table[table["status"] == "failed"].groupby(["group", "loss"]).size()
    for (group, loss, metric), sub in pms.groupby(["group", "loss", "metric"], sort=False):
        nested = sub["meta_seed"].nunique() > 1 or sub["meta_seed"].iloc[0] != "-"
        # a run with a diverged seed has no mean (NaN), as in :func:`collect`: it is counted,
        # never averaged over the seeds that happened to survive
        means = sub["mean"].where(sub["n_diverged"] == 0).dropna()
        rows.append(
            dict(
                group=group,
                loss=loss,
                metric=metric,
                mean=float(means.mean()) if nested else float(sub["mean"].iloc[0]),
                std=float(means.std())
                if nested and len(means) > 1
                else (0.0 if nested and len(means) else float(sub["std"].iloc[0])),
                n=int(len(sub)) if nested else int(sub["n"].iloc[0]),
                unit="meta-seeds" if nested else "seeds",
                n_diverged=int(sub["n_diverged"].sum()),
                failed=int(failed.get((group, loss), 0)),
            )
        )
    import pandas as pd

    out = pd.DataFrame(rows)
    if len(out):
        most = out.groupby(["group", "metric"])["n"].transform("max")
        out["short"] = out["n"] < most
    return out


def escape_markdown(text: str) -> str:
    """A table cell: ``|`` would start a new column, so it is escaped."""
    return str(text).replace("|", "\\|")


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "|": r"\textbar{}",
}


def escape_latex(text: str) -> str:
    """A LaTeX table cell: each special character replaced in one pass."""
    return "".join(_LATEX.get(c, c) for c in str(text))


def _pooled_cell(r) -> str:
    text = "NaN" if not math.isfinite(r["mean"]) else f"{r['mean']:.4f} ± {r['std']:.4f}"
    notes = [f"n={r['n']} {r['unit']}"]
    if r["n_diverged"]:
        notes.append(f"{r['n_diverged']} diverged")
    if r["failed"]:
        notes.append(f"{r['failed']} failed")
    if r.get("short"):
        notes.append("fewer seeds than planned")
    return f"{text} ({', '.join(notes)})"


def pooled_markdown(pool) -> str:
    """The pooled view as markdown: rows (group, loss), columns metrics; labels escaped."""
    if not len(pool):
        return ""
    metrics = list(dict.fromkeys(pool["metric"]))
    lines = ["| group | loss | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for (group, loss), sub in pool.groupby(["group", "loss"], sort=False):
        cells = {r["metric"]: _pooled_cell(r) for _, r in sub.iterrows()}
        lines.append(
            f"| {escape_markdown(group)} | {escape_markdown(loss)} | "
            + " | ".join(escape_markdown(cells.get(m, "")) for m in metrics)
            + " |"
        )
    return "\n".join(lines)


def pooled_latex(pool) -> str:
    """The pooled view as a booktabs LaTeX table (mean ± std, n), every label escaped."""
    metrics = list(dict.fromkeys(pool["metric"]))
    head = " & ".join(["group", "loss", *(escape_latex(m) for m in metrics)])
    lines = [
        r"\begin{tabular}{ll" + "r" * len(metrics) + "}",
        r"\toprule",
        head + r" \\",
        r"\midrule",
    ]
    for (group, loss), sub in pool.groupby(["group", "loss"], sort=False):
        cells = {}
        for _, r in sub.iterrows():
            mean = "NaN" if not math.isfinite(r["mean"]) else f"{r['mean']:.4f}"
            std = "" if not math.isfinite(r["std"]) else rf" $\pm$ {r['std']:.4f}"
            cells[r["metric"]] = f"{mean}{std} (n={r['n']})"
        lines.append(
            " & ".join(
                [escape_latex(group), escape_latex(loss)] + [cells.get(m, "") for m in metrics]
            )
            + r" \\"
        )
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)

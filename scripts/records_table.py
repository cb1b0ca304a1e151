"""The tables of recorded experiments, generated from the records themselves.

    python scripts/records_table.py            # print the full table
    python scripts/records_table.py --write    # the full table into docs/results.md, the short one
                                               # and the cross-method table of cases (cases_table)
                                               # into README.md (between their markers), and each
                                               # record's section into experiments/<name>/README.md
    python scripts/records_table.py --check    # exit 1 if any of them is not what the records say

One row per experiment recorded under the protocol of docs/protocol.md (an
``experiments/<name>/nested_comparison.json``: repeated meta-training, fresh test draws, tuned
baselines): the search's mean over its meta-training runs and test draws, each run's own mean,
the reference baseline (chosen on validation before testing), the difference with its
interval, the Holm-adjusted p and the verdict, and how many single runs were called better /
worse on their own. Nothing in the table is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from metaloss.metatest import format_number

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- records:begin (scripts/records_table.py --write) -->", "<!-- records:end -->"
SHORT_BEGIN, SHORT_END = (
    "<!-- records-short:begin (scripts/records_table.py --write) -->",
    "<!-- records-short:end -->",
)


def _short(verdict: str) -> str:
    return {
        "significantly better": "**better**",
        "significantly worse": "worse",
        "no significant difference": "no difference",
    }.get(verdict, verdict)


def row(name: str, rec: dict) -> str:
    sig = rec["significance"]
    runs = ", ".join(format_number(m) for m in sig["learned_run_means"])
    alone = [r["verdict"] for r in sig["per_run"]]
    counts = (
        f"{alone.count('significantly better')} better, "
        f"{alone.count('significantly worse')} worse, "
        f"{sum(v == 'no significant difference' for v in alone)} no diff."
    )
    others = ", ".join(
        f"{_short(r['verdict'])} vs {b}"
        for b, r in sig["pairwise"].items()
        if b != sig["best_baseline"]
    )
    metric = rec["metric"]
    return (
        f"| `{name}` | {metric} | {len(sig['learned_run_means'])} × {sig['n_seeds']} | "
        f"{format_number(sig['learned_mean'])} ({runs}) | "
        f"{format_number(sig['best_baseline_mean'])} ({sig['best_baseline']}) | "
        f"{format_number(sig['difference'])} "
        f"[{format_number(sig['ci_low'])}, {format_number(sig['ci_high'])}] "
        f"({sig['ci_level']:.0%}) | "
        f"{format_number(sig['p_value_holm'], '.3g')} | {_short(sig['verdict'])} | "
        f"{counts} | {others} |"
    )


def short_row(name: str, rec: dict) -> str:
    sig = rec["significance"]
    return (
        f"| `{name}` | {rec['metric']} | {format_number(sig['learned_mean'])} | "
        f"{format_number(sig['best_baseline_mean'])} ({sig['best_baseline']}) | "
        f"{format_number(sig['difference'])} "
        f"[{format_number(sig['ci_low'])}, {format_number(sig['ci_high'])}] | "
        f"{format_number(sig['p_value_holm'], '.3g')} | {_short(sig['verdict'])} |"
    )


def short_table(root: Path = ROOT / "experiments") -> str:
    """README's table: the verdict columns of :func:`table`."""
    recs = sorted(root.glob("*/nested_comparison.json"))
    head = (
        "| experiment | metric | learned | reference tuned baseline | difference [95% CI] "
        "| p (Holm) | verdict |"
    )
    lines = [head, "|" + "---|" * 7]
    lines += [short_row(f.parent.name, json.loads(f.read_text())) for f in recs]
    return "\n".join(lines)


def table(root: Path = ROOT / "experiments") -> str:
    recs = sorted(root.glob("*/nested_comparison.json"))
    head = (
        "| experiment | metric | runs × draws | learned: all runs (each run) "
        "| reference tuned baseline (chosen on validation) | difference [CI] | p (Holm) "
        "| verdict | runs alone | vs the other baselines |"
    )
    lines = [head, "|" + "---|" * 10]
    lines += [row(f.parent.name, json.loads(f.read_text())) for f in recs]
    return "\n".join(lines)


CASES_BEGIN, CASES_END = (
    "<!-- cases:begin (scripts/records_table.py --write) -->",
    "<!-- cases:end -->",
)
# the cross-method table's columns: a record's column is its loss's class (a residual: its
# family searched as a warm start on a tuned baseline, with the learned lr tuned)
METHODS = {
    "metaloss.losses.mlp.ML3Loss": "ML3",
    "metaloss.losses.taylor.TaylorGLO": "TaylorGLO",
    "metaloss.losses.symbolic.SymbolicLoss": "symbolic search",
}
WARM, OTHER = "warm-started family", "another family, cold start"
COLUMNS = ["ML3", "TaylorGLO", "symbolic search", OTHER, WARM]


def _config(name: str, overrides: list[str]):
    """Experiment ``name`` as Hydra composes it with the record's own overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metaloss.config import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="meta", overrides=[f"experiment={name}", *overrides])


def method(name: str, overrides: list[str] | None = None) -> tuple[str, str]:
    """(column, family) of a record: which search made its learned loss."""
    return _method_of(_config(name, list(overrides or [])).loss)


def _method_of(loss) -> tuple[str, str]:
    """(column, family) from a composed ``loss`` node."""
    target = str(loss._target_)
    if target == "metaloss.residual.Residual":
        return WARM, f"{loss.family} on {loss.base}"
    family = target.rsplit(".", 1)[-1]
    return METHODS.get(target, OTHER), family


def _case_of(d: Path, rec: dict) -> tuple[tuple, str | None]:
    """(the case's key, the experiment whose tuning made its tuned.json, if recorded): records
    with the same tuned.json (sha256), test seeds and metric share a case (task, model,
    optimizer, budget, the baselines' settings and the test draws)."""
    import hashlib

    record = json.loads((d / "record.json").read_text())
    command = (record.get("tune") or {}).get("command") or []
    tuned_by = [c.split("=", 1)[1] for c in command if c.startswith("experiment=")]
    sha = hashlib.sha256((d / "tuned.json").read_bytes()).hexdigest()
    return (sha, tuple(rec["seeds"]), rec["metric"]), (tuned_by[0] if tuned_by else None)


def _steps(n: float) -> str:
    return f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def _selection_steps(d: Path, inner_steps: int) -> float:
    """The held-out selection's inner steps per run (candidates × seeds × K), 0 without one."""
    per_run = []
    for f in sorted(d.glob("meta_seed_*/selection.json")):
        sel = json.loads(f.read_text())
        per_run.append(len(sel["candidates"]) * int(sel["seeds"]) * inner_steps)
    return float(np.mean(per_run)) if per_run else 0.0


def _learned_cell(d: Path, rec: dict, inner_steps: int, base: str | None = None) -> str:
    """``base``: a warm start's base loss, whose tuning (its values and, in ``_warm_lr``
    records, the search's lr) the learned loss starts from: its compute is counted too."""
    sig = rec["significance"]
    learned = [(h or {}).get("learned") or {} for h in rec["hyperparameters"]]
    search = float(np.mean([r.get("meta_training_steps", float("nan")) for r in learned]))
    tuning = [r["tuning_steps"] for r in learned if r.get("tuning_steps") is not None]
    base_tuning = [
        h[base]["tuning_steps"]
        for h in rec["hyperparameters"]
        if base and (h or {}).get(base, {}).get("tuning_steps") is not None
    ]
    selection = _selection_steps(d, inner_steps)
    compute = (
        f"search {_steps(search)}"
        + (f" + selection {_steps(selection)}" if selection else "")
        + (f" + lr {_steps(float(np.mean(tuning)))}" if tuning else "")
        + (f" + {base}'s tuning {_steps(float(np.mean(base_tuning)))}" if base_tuning else "")
    )
    return (
        f"{format_number(sig['learned_mean'])} "
        f"({'+' if sig['difference'] >= 0 else ''}{format_number(sig['difference'])} "
        f"[{format_number(sig['ci_low'])}, {format_number(sig['ci_high'])}], "
        f"p {format_number(sig['p_value_holm'], '.2g')}, {_short(sig['verdict'])}; "
        f"{len(sig['learned_run_means'])} × {sig['n_seeds']}; {compute}) `{d.name}`"
    )


def _baseline_cell(rec: dict) -> str:
    from scipy import stats

    sig = rec["significance"]
    ref = sig["best_baseline"]
    if ref is None:
        return "none (every baseline diverged)"
    values = np.asarray(rec["baselines"][ref][rec["metric"]], float)
    n = len(values)
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))
    steps = {((h or {}).get(ref) or {}).get("tuning_steps") for h in rec["hyperparameters"]}
    steps -= {None}
    tuned = f"; tuning {'/'.join(_steps(s) for s in sorted(steps))}" if steps else ""
    return f"{ref}: {format_number(float(values.mean()))} ± {format_number(half)}{tuned}"


def cases_table(root: Path = ROOT / "experiments") -> str:
    """README's cross-method table: one row per case (the records with one tuned.json, test
    seeds and metric: the same task, model, optimizer, budget, baselines and test draws), one
    column per kind of search, read from each record's composed config (with its recorded
    overrides); each cell the learned loss's mean over its runs and draws, its difference from
    the record's reference tuned baseline (chosen on validation) with the 95% CI, the
    Holm-adjusted p and the verdict, runs × draws, and its compute in inner steps (the search,
    the held-out selection if any, and the lr tuning the baselines also got, if the lr was
    tuned). An empty cell: no such record. Records of one case made on different machines can
    hold different baseline results (and so another reference): the baseline cell then lists
    each, with the records it belongs to. A row is named by the experiment whose tuning made
    its tuned.json (else by its records), with the file's sha256 prefix if two rows would
    share a name."""
    cases: dict[tuple, list[tuple[Path, dict]]] = {}
    tuned_by: dict[tuple, set[str]] = {}
    for f in sorted(root.glob("*/nested_comparison.json")):
        rec = json.loads(f.read_text())
        key, by = _case_of(f.parent, rec)
        cases.setdefault(key, []).append((f.parent, rec))
        tuned_by.setdefault(key, set()).update([by] if by else [])
    labels = {
        key: ", ".join(f"`{n}`" for n in sorted(tuned_by[key] or {d.name for d, _ in recs}))
        for key, recs in cases.items()
    }
    rows = []
    for key, recs in cases.items():
        cells: dict[str, list[str]] = {c: [] for c in COLUMNS}
        for d, rec in recs:
            overrides = json.loads((d / "record.json").read_text()).get("overrides") or []
            cfg = _config(d.name, overrides)
            column, family = _method_of(cfg.loss)  # one composition per record
            base = str(cfg.loss.base) if column == WARM else None
            cell = _learned_cell(d, rec, int(cfg.meta.inner_steps), base)
            cells[column].append(f"{family}: {cell}")
        # the same tuned.json and test seeds give the same baseline results on one machine; on
        # another CPU a 2000-step run can take another trajectory (docs/protocol.md), and so
        # the reference chosen on validation can differ: each record's own is listed with it
        refs: dict[str, list[str]] = {}
        for d, rec in recs:
            refs.setdefault(_baseline_cell(rec), []).append(d.name)
        baseline = (
            next(iter(refs))
            if len(refs) == 1
            else "<br>".join(
                f"{cell} ({', '.join(f'`{n}`' for n in names)})" for cell, names in refs.items()
            )
        )
        label = labels[key]
        if list(labels.values()).count(label) > 1:
            label += f" (tuned.json {key[0][:8]})"
        rows.append(
            f"| {label} | {key[2]} | {baseline} | "
            + " | ".join("<br>".join(cells[c]) for c in COLUMNS)
            + " |"
        )
    head = (
        "| case | metric | reference tuned baseline (mean ± 95% CI over its test draws) | "
        + " | ".join(COLUMNS)
    )
    return "\n".join([head + " |", "|" + "---|" * (3 + len(COLUMNS)), *sorted(rows)])


SECTION_BEGIN, SECTION_END = (
    "<!-- record:begin (scripts/records_table.py --write) -->",
    "<!-- record:end -->",
)


def section(d: Path) -> str:
    """An experiment README's record section, from its nested_comparison.{json,md}, record.json
    and tuned.json: what was run, the protocol, the table and verdicts, the compute, and where
    the earlier records are."""
    rec = json.loads((d / "nested_comparison.json").read_text())
    record = json.loads((d / "record.json").read_text())
    tuned = json.loads((d / "tuned.json").read_text())
    protocol = rec["protocol"]
    m, name = len(rec["meta_seeds"]), d.name
    horizon = (
        f"meta-trained with K = {protocol['meta_training_horizon']} inner steps and tested with "
        f"{protocol['meta_test_steps']}"
        + (f" — declared: {protocol['horizon_note']}" if protocol.get("horizon_note") else "")
    )
    budget = tuned.get("budget") or {}
    trials = sorted({e.get("n_trials") for e in tuned["losses"].values()})
    tune = record.get("tune") or {}
    seconds = ", ".join(f"{e['seconds']:.0f}" for e in record["meta"])
    table_md, _, verdict = (d / "nested_comparison.md").read_text().partition("\n\n")
    per_run = [(h or {}).get("learned", {}) for h in rec["hyperparameters"]]
    lrs = ", ".join(f"{r.get('lr', float('nan')):.3g}" for r in per_run)
    learned_lr = (
        f"the learned loss's lr tuned the same way, per run: {lrs}"
        if any("tuned" in str(r.get("source", "")) for r in per_run)
        else f"the learned loss trains at its config's inner lr, {lrs}"
    )
    history = sorted(p.name for p in (d / "history").iterdir()) if (d / "history").is_dir() else []
    lines = [
        f"## Record under the protocol of docs/protocol.md (started {record['started']})",
        "",
        "```bash",
        f"python scripts/record_experiment.py {name} --meta-seeds {m}"
        + (" --skip-tune" if tune.get("reused") else "")
        + "   # tune, then:",
        (
            f"metaloss-meta experiment={name} seed=<m> "
            f"meta_test.tuned=experiments/{name}/tuned.json   # m = 0 .. {m - 1}"
        ),
        "```",
        "",
        f"- {m} meta-training runs (`meta_seed_<m>/`: each learned loss, "
        "its comparison and plots), each "
        f"meta-tested on the same {len(rec['seeds'])} test seeds; every seed draws its own data "
        f"(fresh draws: {protocol['fresh_draws']}).",
        f"- Horizon: {horizon}.",
        f"- Baselines tuned on the validation split ({tuned.get('sampler')}, "
        f"{'/'.join(map(str, trials))} trials "
        f"per baseline x {len(tuned.get('seeds', []))} seeds x {tuned.get('steps')} steps"
        + (f", {budget.get('steps_used')} inner steps each" if budget.get("steps_used") else "")
        + f"; {learned_lr}). Tuning took "
        f"{tune.get('seconds', 'NaN')} s"
        + (" (an earlier run's, kept: same tuned.json)" if tune.get("reused") else "")
        + f"; each meta-training run with its meta-test {seconds} s"
        + (
            f" (on {record['machine']['cpu']}, "
            f"{record['machine'].get('cpu_capability', '?')} kernels, "
            f"torch {record['machine']['torch']})."
            if record.get("machine")
            else "."
        ),
        "",
        table_md.strip(),
        "",
        "```text",
        verdict.strip(),
        "```",
        "",
        "Earlier records of this experiment, kept as they were read: "
        + (", ".join(f"`history/{h}/`" for h in history) if history else "none")
        + ". The text after this "
        "section was written with the earlier records: its numbers are theirs, not this record's.",
    ]
    return "\n".join(lines)


def _replace_between(content: str, begin: str, end: str, text: str, where: str) -> str:
    if begin in content and end in content:
        before, rest = content.split(begin, 1)
        return f"{before}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}"
    head, _, body = content.partition("\n")  # after the title line
    return f"{head}\n\n{begin}\n{text}\n{end}\n{body}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--write", action="store_true", help="write the tables into docs/results.md and README.md"
    )
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if a table differs from the records"
    )
    args = ap.parse_args()
    text = table()
    if not (args.write or args.check):
        print(text)
        return
    wanted = {}
    for page_path, (begin, end, body) in {
        ROOT / "docs" / "results.md": (BEGIN, END, text),
        ROOT / "README.md": (SHORT_BEGIN, SHORT_END, short_table()),
    }.items():
        content = page_path.read_text()
        if begin not in content or end not in content:
            sys.exit(f"{page_path.relative_to(ROOT)} has no {begin} ... {end} markers")
        wanted[page_path] = _replace_between(content, begin, end, body, page_path.name)
    readme = ROOT / "README.md"
    if CASES_BEGIN not in wanted[readme] or CASES_END not in wanted[readme]:
        sys.exit(f"README.md has no {CASES_BEGIN} ... {CASES_END} markers")
    wanted[readme] = _replace_between(wanted[readme], CASES_BEGIN, CASES_END, cases_table(), "")
    for f in sorted((ROOT / "experiments").glob("*/nested_comparison.json")):
        page = f.parent / "README.md"
        if not page.is_file():
            page.write_text(f"# {f.parent.name}\n")
        wanted[page] = _replace_between(
            page.read_text(), SECTION_BEGIN, SECTION_END, section(f.parent), str(page)
        )
    stale = [str(p.relative_to(ROOT)) for p, text_ in wanted.items() if p.read_text() != text_]
    if args.check:
        if stale:
            sys.exit(
                f"not what the records say: {', '.join(stale)}; "
                "run python scripts/records_table.py --write"
            )
        return
    for p in stale:
        (ROOT / p).write_text(wanted[ROOT / p])
        print(f"wrote {p}")


if __name__ == "__main__":
    main()

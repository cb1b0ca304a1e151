"""Re-decide recorded comparisons under the current verdict rule, from their own per-seed values.

    python scripts/reevaluate_records.py            # every comparison.json and
                                                    # nested_comparison.json under experiments/
                                                    # (not history/: kept as read)
    python scripts/reevaluate_records.py --check    # exit 1 if any record is not up to date

A comparison.json keeps every loss's per-seed validation and test values, so a change of the
*decision* rule (which baseline is the reference, how p-values are corrected) needs no new
training: this recomputes ``significance`` with :func:`metaloss.metatest.significance` and
rewrites comparison.json and comparison.md. The decision the record carried before is kept in
the file under ``previous_significance`` (a list, oldest first: every verdict that was ever
read stays on record), and the script prints every verdict that changed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEPT = ("best_baseline", "selected_on", "p_value", "p_value_holm", "verdict", "test")


def reevaluate(path: Path, write: bool) -> tuple[dict, dict] | None:
    """(old significance, new significance) if the record's decision changes, else None."""
    from metaloss.cli.comparison import format_verdict
    from metaloss.cli.logger import write_json
    from metaloss.metatest import significance
    from metaloss.report import format_table, jsonable, summarize

    rec = json.loads(path.read_text())
    if path.name == NESTED:
        return _reevaluate_nested(path, rec, write)
    old = rec.get("significance") or {}
    md = path.with_name("comparison.md")
    # rows in the order the record's table had them (the learned loss, then `compare:`)
    shown = [
        line.split("|")[1].strip()
        for line in (md.read_text().splitlines() if md.is_file() else [])
        if line.startswith("| ") and not line.startswith("| run ")
    ]
    order = [n for n in shown if n in rec["results"]] + sorted(set(rec["results"]) - set(shown))
    results = {
        loss: {
            k: [float("nan") if v is None else float(v) for v in vals]
            for k, vals in rec["results"][loss].items()
        }
        for loss in order
    }
    decided = significance(results, rec["metric"], alpha=float(old.get("alpha", 0.05)))
    new = jsonable(decided)
    if _same(old, new):
        return None
    if write:
        history = rec.get("previous_significance", [])
        before = {k: old.get(k) for k in KEPT if k in old}
        if not _same(
            before, {k: new.get(k) for k in KEPT if k in old}
        ):  # only a decision that differed
            history.append(before)
        rec["significance"], rec["previous_significance"] = new, history
        write_json(path, rec)
        md.write_text(f"{format_table(summarize(results))}\n\n{format_verdict(decided)}\n")
    return old, new


NESTED = "nested_comparison.json"


def _reevaluate_nested(path: Path, rec: dict, write: bool) -> tuple[dict, dict] | None:
    """A record of repeated meta-training, re-combined from its runs' own files
    (``meta_seed_<m>/comparison.json``, the values as each meta-test wrote them) and re-decided."""
    from metaloss.cli.logger import write_json
    from metaloss.nested import combine, format_nested
    from metaloss.report import jsonable

    old = rec.get("significance") or {}
    runs = [
        json.loads((path.parent / f"meta_seed_{m}" / "comparison.json").read_text())
        for m in rec["meta_seeds"]
    ]
    again = jsonable(combine(runs, rec["meta_seeds"], alpha=float(old.get("alpha", 0.05))))
    kept = {k: v for k, v in rec.items() if k != "previous_significance"}
    if _same(kept, again):
        return None
    new = again["significance"]
    if write:
        history = rec.get("previous_significance", [])
        before = {k: old.get(k) for k in KEPT if k in old}
        if not _same(before, {k: new.get(k) for k in KEPT if k in old}):
            history.append(before)
        write_json(path, {**again, "previous_significance": history} if history else again)
        path.with_suffix(".md").write_text(format_nested(again) + "\n")
    return old, new


def records(root: Path) -> list[Path]:
    """Every comparison of the current records: history/ keeps earlier records as they were read."""
    found = sorted([*root.rglob("comparison.json"), *root.rglob(NESTED)])
    return [p for p in found if "history" not in p.relative_to(root).parts]


def _same(a, b) -> bool:
    """Equal decisions: every key and text equal, numbers within 1e-9 relative (another scipy
    or CPU may move a p-value's last bits without changing anything decided)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _p(v) -> str:
    return "NaN" if v is None else f"{v:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="comparison.json files (default: all under experiments/)",
    )
    ap.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a record is out of date"
    )
    args = ap.parse_args()
    paths = args.paths or records(ROOT / "experiments")
    stale = 0
    for path in paths:
        changed = reevaluate(path, write=not args.check)
        if changed is None:
            continue
        stale += 1
        old, new = changed
        name = path.parent.relative_to(ROOT) if path.is_relative_to(ROOT) else path.parent
        print(
            f"{name}: {old.get('best_baseline')} p={_p(old.get('p_value'))} "
            f"-> {old.get('verdict')}  ==>  "
            f"{new['best_baseline']} (chosen on {new['selected_on']}) p={_p(new['p_value'])}, "
            f"Holm p={_p(new['p_value_holm'])} -> {new['verdict']}"
        )
    if args.check and stale:
        sys.exit(f"{stale} record(s) decided under another rule: run scripts/reevaluate_records.py")


if __name__ == "__main__":
    main()

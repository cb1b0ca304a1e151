"""The README's table of recorded experiments, generated from the records themselves.

    python scripts/records_table.py            # print the table
    python scripts/records_table.py --write    # put it into README.md between its markers
    python scripts/records_table.py --check    # exit 1 if README.md's table is not what the records say

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

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- records:begin (scripts/records_table.py --write) -->", "<!-- records:end -->"


def _num(x, spec: str = ".4f") -> str:
    return "NaN" if x is None else format(x, spec)


def _short(verdict: str) -> str:
    return {"significantly better": "**better**", "significantly worse": "worse",
            "no significant difference": "no difference"}.get(verdict, verdict)


def row(name: str, rec: dict) -> str:
    sig = rec["significance"]
    runs = ", ".join(_num(m) for m in sig["learned_run_means"])
    alone = [r["verdict"] for r in sig["per_run"]]
    counts = (f"{alone.count('significantly better')} better, {alone.count('significantly worse')} worse, "
              f"{sum(v == 'no significant difference' for v in alone)} no diff.")
    others = ", ".join(f"{_short(r['verdict'])} vs {b}" for b, r in sig["pairwise"].items() if b != sig["best_baseline"])
    metric = rec["metric"]
    return (f"| `{name}` | {metric} | {len(sig['learned_run_means'])} × {sig['n_seeds']} | "
            f"{_num(sig['learned_mean'])} ({runs}) | {_num(sig['best_baseline_mean'])} ({sig['best_baseline']}) | "
            f"{_num(sig['difference'])} [{_num(sig['ci_low'])}, {_num(sig['ci_high'])}] | "
            f"{_num(sig['p_value_holm'], '.3g')} | {_short(sig['verdict'])} | {counts} | {others} |")


def table(root: Path = ROOT / "experiments") -> str:
    recs = sorted(root.glob("*/nested_comparison.json"))
    head = ("| experiment | metric | runs × draws | learned: all runs (each run) | reference tuned baseline "
            "(chosen on validation) | difference [95% CI] | p (Holm) | verdict | runs alone | vs the other baselines |")
    lines = [head, "|" + "---|" * 10]
    lines += [row(f.parent.name, json.loads(f.read_text())) for f in recs]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the table into README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's table differs from the records")
    args = ap.parse_args()
    text = table()
    if not (args.write or args.check):
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        sys.exit(f"README.md has no {BEGIN} ... {END} markers")
    before, rest = content.split(BEGIN, 1)
    current, after = rest.split(END, 1)
    if args.check:
        if current.strip() != text.strip():
            sys.exit("README.md's table of records is not what the records say: run "
                     "python scripts/records_table.py --write")
        return
    readme.write_text(f"{before}{BEGIN}\n{text}\n{END}{after}")


if __name__ == "__main__":
    main()

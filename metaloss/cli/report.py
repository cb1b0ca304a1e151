"""`metaloss-report <dir>`: tables and a plot of every result under a directory.

Reads every `metrics.json` (metaloss-train runs) and `comparison.json` (meta-tests) under the
directory into one tidy table (metaloss.report.tidy: group, loss, meta-seed, seed, metric,
value, status) and writes, into the directory (or ``--out``), once everything has been read
and checked:

* report.md — per loss, mean ± std over seeds (meta-tests of several meta-training runs: one
  value per run, the run's mean, so n counts runs), best mean in bold; then, when meta-tests of
  several runs are found, a row per meta-training run; failed runs (a run directory with no
  result file) are listed, never dropped;
* report.csv — the tidy table itself; report.tex — the pooled view as a booktabs table;
* report.json, report.png — the summary and a bar chart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaloss.report import (
    UnreadableResult,
    collect,
    escape_markdown,
    format_table,
    jsonable,
    per_meta_seed,
    plot,
    pooled,
    pooled_latex,
    splits,
    summarize,
    tidy,
)
from metaloss.runs import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="metaloss-report", description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path, help="a Hydra multirun directory or any run directory")
    ap.add_argument("--split", default="test", help="metric namespace to tabulate (test, val)")
    ap.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the directory)"
    )
    args = ap.parse_args(argv)
    try:  # everything is read and checked before anything is written
        table = tidy(args.directory)
        summary = summarize(collect(args.directory), prefix=f"{args.split}/")
    except (FileNotFoundError, UnreadableResult) as e:
        print(f"metaloss-report: {e}", file=sys.stderr)
        return 2
    valid = splits(table)
    if args.split not in valid:
        print(
            f"metaloss-report: --split {args.split!r}: the results under {args.directory} have "
            f"{', '.join(valid) or 'no metrics'} (nothing was written)",
            file=sys.stderr,
        )
        return 2
    out = args.out or args.directory
    text = format_table(summary)
    runs = per_meta_seed(table, args.split)
    if runs["meta_seed"].nunique() > 1:
        lines = ["| group | loss | meta-seed | metric | mean ± std over test seeds | n |"]
        lines.append("|---|---|---|---|---|---|")
        for _, r in runs.iterrows():
            cell = f"{r['mean']:.4f} ± {r['std']:.4f}" + (
                f" ({r['n_diverged']} diverged)" if r["n_diverged"] else ""
            )
            lines.append(
                f"| {escape_markdown(r['group'])} | {escape_markdown(r['loss'])} | "
                f"{r['meta_seed']} | {r['metric']} | {cell} | {r['n']} |"
            )
        text += "\n\nPer meta-training run:\n\n" + "\n".join(lines)
    failed = table[table["status"] == "failed"]
    if len(failed):
        text += (
            f"\n\n{len(failed)} run(s) left no result (failed, killed or still running): "
            + ", ".join(
                f"{escape_markdown(r['group'])} / {escape_markdown(r['loss'])} (seed {r['seed']})"
                for _, r in failed.iterrows()
            )
        )
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", text + "\n")
    atomic_write_text(out / "report.json", json.dumps(jsonable(summary), indent=2))
    atomic_write_text(out / "report.csv", table.to_csv(index=False))
    atomic_write_text(out / "report.tex", pooled_latex(pooled(table, args.split)) + "\n")
    written = [out / f"report.{x}" for x in ("md", "json", "csv", "tex")]
    written.append(plot(summary, out / "report.png"))
    print(f"\nsaved {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`metaloss-report <dir>`: a table per loss (mean ± std over seeds) and a plot.

Reads every `metrics.json` (metaloss-train multiruns) and `comparison.json` (meta-tests)
under the directory; writes report.md, report.json and report.png into it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaloss.report import UnreadableResult, collect, format_table, jsonable, plot, summarize


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="metaloss-report", description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path, help="a Hydra multirun directory or any run directory")
    ap.add_argument("--split", default="test", help="metric namespace to tabulate (test, val)")
    ap.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the directory)"
    )
    args = ap.parse_args(argv)
    try:
        summary = summarize(collect(args.directory), prefix=f"{args.split}/")
    except (FileNotFoundError, UnreadableResult) as e:
        print(f"metaloss-report: {e}", file=sys.stderr)
        return 2
    out = args.out or args.directory
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(summary)
    print(table)
    (out / "report.md").write_text(table + "\n")
    (out / "report.json").write_text(
        json.dumps(jsonable(summary), indent=2)
    )  # strict JSON: NaN as null
    print(
        f"\nsaved {out / 'report.md'}, {out / 'report.json'}, {plot(summary, out / 'report.png')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Redraw the recorded experiments' comparison figures in the current style (metaloss.figures)
from their comparison.json files — data only, nothing is retrained:

    python scripts/regenerate_figures.py                 # every experiments/**/comparison.json
    python scripts/regenerate_figures.py binary99_warm   # one experiment

Each comparison.png is rewritten beside its comparison.json, with a comparison.pdf.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaloss.figures import comparison_figure

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="experiments/<name> (default: all)")
    args = ap.parse_args()
    dirs = [ROOT / "experiments" / n for n in args.names] or [ROOT / "experiments"]
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"regenerate_figures: no such experiment directory: {d}")
        for f in sorted(d.rglob("comparison.json")):
            if "history" in f.relative_to(ROOT / "experiments").parts:
                continue  # earlier records are kept as they were read
            rec = json.loads(f.read_text())
            where = f.parent.relative_to(ROOT / "experiments")
            title = f"{where.parts[0]}" + (f", {where.parts[1]}" if len(where.parts) > 1 else "")
            for p in comparison_figure(
                rec["results"],
                f.parent / "comparison.png",
                significance=rec.get("significance"),
                title=title.replace("meta_seed_", "meta-seed "),
            ):
                print(p.relative_to(ROOT))


if __name__ == "__main__":
    main()

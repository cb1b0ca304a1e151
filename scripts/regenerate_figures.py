"""Redraw the recorded experiments' figures in the current style (metaloss.figures) from their
files — nothing is retrained:

    python scripts/regenerate_figures.py                 # every experiments/**/comparison.json
    python scripts/regenerate_figures.py binary99_warm   # one experiment

Each comparison.png is rewritten beside its comparison.json (from its per-seed values), with a
comparison.pdf; where a learned_loss.pt sits beside it, learned_vs_baselines.png / .pdf too: the
learned loss and every baseline at the values the meta-test trained them with (comparison.json's
`hyperparameters`), on the task the file records (rebuilt by option name from conf/, never by a
path the file names).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaloss.config import load_option
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
            title = title.replace("meta_seed_", "meta-seed ")
            for p in comparison_figure(
                rec["results"],
                f.parent / "comparison.png",
                significance=rec.get("significance"),
                title=title,
            ):
                print(p.relative_to(ROOT))
            if (f.parent / "learned_loss.pt").is_file():
                print(shapes(f.parent, rec, title).relative_to(ROOT))


def shapes(run: Path, rec: dict, title: str) -> Path:
    """learned_vs_baselines.png / .pdf of one recorded meta-test (see the module docstring)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metaloss.losses.io import load_learned_loss
    from metaloss.plots import plot_losses

    learned = load_learned_loss(run / "learned_loss.pt")
    setup = learned.meta["setup"]["task"]
    task_cfg = OmegaConf.merge(load_option("task", setup["option"]), setup["config"])
    task = instantiate(task_cfg)
    losses = {"learned": learned}
    for name, hp in (rec.get("hyperparameters") or {}).items():
        if name == "learned":
            continue
        option = OmegaConf.merge(load_option("loss", name), hp.get("params") or {})
        losses[name] = instantiate(option)
    return plot_losses(
        losses,
        task.kind,
        run / "learned_vs_baselines.png",
        num_classes=task.num_classes,
        class_counts=task.class_counts,
        title=f"learned loss vs baselines ({title})",
    )


if __name__ == "__main__":
    main()

"""Collect `metaloss-fewshot` runs into a recorded comparison: one row per (episodes, inner
loss), mean ± 95% CI over the meta-test episodes, and each loss against a reference loss
(MAML: cross-entropy, or squared error for regression episodes, by default) on the *same*
episodes: a paired t-test over episodes with Holm's adjustment over the rows of a setting
(metaloss.metatest.paired / holm).

    python scripts/fewshot_record.py multirun/fewshot/<date> --name fewshot
    python scripts/fewshot_record.py DIR ... --name fewshot --readme   # also README's table

Writes experiments/<name>/results.json (every run's result.json, as recorded) and
experiments/<name>/results.md (the table); with --readme, replaces the table between
<!-- fewshot:start --> and <!-- fewshot:end --> in README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from metaloss.metatest import holm, paired

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- fewshot:start -->", "<!-- fewshot:end -->"


def setting(r: dict) -> str:
    e = r["episodes"]
    if e["name"] == "sinusoid":
        return f"sinusoid {e['shot']}-shot"
    return f"{e['way']}-way {e['shot']}-shot"


def _problems(r: object) -> list[str]:
    """What makes ``r`` not a metaloss-fewshot result (empty: it is one)."""
    if not isinstance(r, dict):
        return ["not a mapping"]
    out = []
    need = {"loss": str, "seed": int, "metric": str, "mean": (int, float), "ci95": (int, float)}
    need |= {"per_episode": list, "episodes": dict, "config": dict, "test_episodes": int}
    for key, kind in need.items():
        if not isinstance(r.get(key), kind) or isinstance(r.get(key), bool):
            out.append(f"{key}: missing or not a {getattr(kind, '__name__', 'number')}")
    if out:
        return out
    values = r["per_episode"]
    if r["metric"] not in ("test/acc", "test/mse"):
        out.append(f"metric = {r['metric']!r}: test/acc or test/mse")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not values or not numbers or not all(math.isfinite(v) for v in values):
        out.append("per_episode: must be a non-empty list of finite numbers")
    elif r["metric"] == "test/acc" and not all(0 <= v <= 1 for v in values):
        out.append("per_episode: accuracies must lie in [0, 1]")
    elif r["metric"] == "test/mse" and min(values) < 0:
        out.append("per_episode: squared errors must be >= 0")
    elif len(values) != r["test_episodes"]:
        out.append(f"per_episode has {len(values)} values, test_episodes = {r['test_episodes']}")
    elif abs(sum(values) / len(values) - r["mean"]) > 1e-9:
        out.append(f"mean = {r['mean']} is not the mean of per_episode")
    for key in ("episodes", "model", "maml", "fewshot"):
        if not isinstance(r["config"].get(key), dict):
            out.append(f"config.{key}: missing")
    return out


def collect(dirs: list[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        found = sorted(d.rglob("result.json"))
        if not found:
            sys.exit(f"fewshot_record: no result.json under {d}")
        for f in found:
            try:
                r = json.loads(f.read_text())
            except ValueError as err:
                sys.exit(f"fewshot_record: {f} is not JSON ({err})")
            hydra_cfg = f.parent / ".hydra" / "config.yaml"
            if isinstance(r, dict) and "config" not in r and hydra_cfg.is_file():
                # results written before result.json carried its settings: the run's own
                # Hydra record of them (read as data: yaml.safe_load)
                full = yaml.safe_load(hydra_cfg.read_text()) or {}
                keys = ("episodes", "model", "fewshot_loss", "maml", "fewshot")
                r["config"] = {k: full.get(k) for k in keys}
            problems = _problems(r)
            if problems:
                sys.exit(
                    f"fewshot_record: {f} is not a metaloss-fewshot result (nothing was "
                    "written):\n  " + "\n  ".join(problems)
                )
            r["_source"] = str(f)
            runs.append(r)
    return runs


# what rows compared episode by episode must share: the same meta-test episodes (data, way,
# shot, query, eval seed, number), model, inner loop and meta-training budget
SHARED = ("metric", "episodes_info", "config.episodes", "config.model", "config.maml")
SHARED_FEWSHOT = ("meta_steps", "meta_batch", "lr", "val_every", "val_episodes", "test_episodes")


def _shared(r: dict) -> dict:
    out = {k: r.get(k) if "." not in k else r["config"].get(k.split(".")[1]) for k in SHARED}
    fs = r["config"]["fewshot"]
    out["config.fewshot"] = {k: fs.get(k) for k in (*SHARED_FEWSHOT, "eval_seed")}
    return out


def table(runs: list[dict], references: list[str], alpha: float = 0.05) -> tuple[str, list[dict]]:
    rows, lines = [], []
    lines.append(
        "| setting | inner loss | meta-test (mean ± 95% CI) | vs the reference (MAML) on the "
        "same episodes [95% CI] | p (Holm) | verdict |"
    )
    lines.append("|---|---|---|---|---|---|")
    by_setting: dict[str, list[dict]] = {}
    for r in runs:
        by_setting.setdefault(setting(r), []).append(r)
    for name, group in by_setting.items():
        keys = [(r["loss"], r["seed"]) for r in group]
        if len(set(keys)) != len(keys):
            sys.exit(f"fewshot_record: {name} has two runs of the same loss and seed: {keys}")
        present = [x for x in references if any(r["loss"] == x for r in group)]
        reference = present[0] if present else references[0]
        ref = [r for r in group if r["loss"] == reference]
        if len(ref) != 1:
            sys.exit(
                f"fewshot_record: {name} needs exactly one run of one of {references} "
                f"(the reference), has {len(ref)} of {reference!r}"
            )
        want = _shared(ref[0])
        for r in group:
            differ = [k for k, v in _shared(r).items() if v != want[k]]
            if differ:
                sys.exit(
                    f"fewshot_record: {r['_source']} and {ref[0]['_source']} differ in "
                    f"{', '.join(differ)}: not the same meta-test episodes and set-up, so they "
                    "cannot be compared episode by episode (nothing was written)"
                )
        ref_values = ref[0]["per_episode"]
        higher = group[0]["metric"] == "test/acc"
        stats = {}
        for r in group:
            if r is ref[0]:
                continue
            if len(r["per_episode"]) != len(ref_values):
                sys.exit(
                    f"fewshot_record: {r['_source']}: other meta-test episodes than the reference"
                )
            stats[r["loss"]] = paired(r["per_episode"], ref_values)
        adjusted = holm({k: v["p_value"] for k, v in stats.items() if not math.isnan(v["p_value"])})
        scale = 100 if higher else 1
        unit = "%" if higher else ""
        for r in sorted(group, key=lambda r: (r is not ref[0], r["loss"])):
            digits = 2 if higher else 3
            cell = f"{scale * r['mean']:.{digits}f} ± {scale * r['ci95']:.{digits}f}{unit}"
            row = {"setting": name, "loss": r["loss"], "mean": r["mean"], "ci95": r["ci95"]}
            if r is ref[0]:
                lines.append(f"| {name} | `{r['loss']}` (reference) | {cell} | | | |")
            else:
                s = stats[r["loss"]]
                p = adjusted.get(r["loss"], float("nan"))
                d = s["mean_difference"]
                verdict = (
                    "no difference"
                    if not p < alpha
                    else ("**better**" if (d > 0) == higher else "worse")
                )
                lo, hi = scale * s["ci_low"], scale * s["ci_high"]
                lines.append(
                    f"| {name} | `{r['loss']}` | {cell} | {scale * d:+.{digits}f} "
                    f"[{lo:+.{digits}f}, {hi:+.{digits}f}] "
                    f"| {p:.3g} | {verdict} |"
                )
                row.update(difference=d, ci=[s["ci_low"], s["ci_high"]], p_holm=p, verdict=verdict)
            rows.append(row)
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument(
        "--reference",
        action="append",
        default=None,
        help="the reference loss; repeat for several (the first present in a setting is used; "
        "default: ce, then mse)",
    )
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="default: experiments/<name>")
    args = ap.parse_args()
    runs = collect(args.dirs)
    text, rows = table(runs, args.reference or ["ce", "mse"])
    out = args.out or ROOT / "experiments" / args.name
    out.mkdir(parents=True, exist_ok=True)
    kept = [{k: v for k, v in r.items() if k != "train_history"} for r in runs]  # size
    (out / "results.json").write_text(json.dumps({"rows": rows, "runs": kept}))
    (out / "results.md").write_text(text + "\n")
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        s = readme.read_text()
        if START not in s or END not in s:
            sys.exit(f"fewshot_record: README.md has no {START} ... {END} block")
        head, rest = s.split(START, 1)
        readme.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()

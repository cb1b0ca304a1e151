"""Record a hard-case experiment into experiments/<name>/: tune its baselines, meta-train and
meta-test the learned loss, and copy the results beside the config that made them.

    python scripts/record_experiment.py noise_sym40              # tune, then meta-train + meta-test
    python scripts/record_experiment.py noise_sym40 --skip-tune  # reuse experiments/<name>/tuned.json

Both steps are the apps themselves (``metaloss-tune experiment=<name>`` and
``metaloss-meta experiment=<name>``), run as subprocesses from the repository root, so what
is recorded is exactly what a user reproduces with those two commands. Written to
experiments/<name>/: tuned.json, comparison.{json,md,png}, learned_vs_baselines.png,
learned_loss.{pt,png} and record.json (commands, wall times, the run directories).
The meta-test is given ``meta_test.tuned=<dest>/tuned.json`` (the file just tuned, or the one
kept with ``--skip-tune``), and a comparison whose baselines did not all train with it is not
recorded. A failing step stops the script with its exit code; nothing is copied from a failed run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ["comparison.json", "comparison.md", "comparison.png", "learned_vs_baselines.png",
           "learned_loss.pt", "learned_loss.png"]


def _run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), f"(log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{cmd[0]} failed with exit code {rc}; see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a conf/experiment/<name>.yaml")
    ap.add_argument("--skip-tune", action="store_true", help="reuse experiments/<name>/tuned.json")
    ap.add_argument("--work", default="outputs/record", help="where the runs themselves go")
    ap.add_argument("--dest", default=None, help="where the results go (default: experiments/<name>)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both apps (e.g. logger=none)")
    args = ap.parse_intermixed_args()  # overrides may follow the options
    if not (ROOT / "conf" / "experiment" / f"{args.name}.yaml").is_file():
        sys.exit(f"no experiment {args.name!r}: conf/experiment/{args.name}.yaml does not exist")
    dest = Path(args.dest).resolve() if args.dest else ROOT / "experiments" / args.name
    dest.mkdir(parents=True, exist_ok=True)
    work = (ROOT / args.work / f"{args.name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    work.mkdir(parents=True)
    record: dict = {"experiment": args.name, "overrides": args.overrides, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    common = [f"experiment={args.name}", "progress=false", *args.overrides]
    if not args.skip_tune:
        cmd = [str(BIN / "metaloss-tune"), *common, "meta_test.tuned=null", f"hydra.run.dir={work / 'tune'}"]
        record["tune"] = {"command": cmd[1:], "seconds": round(_run(cmd, work / "tune.log"), 1)}
        shutil.copy(work / "tune" / "tuned.json", dest / "tuned.json")
    elif not (dest / "tuned.json").is_file():
        sys.exit(f"--skip-tune: {dest / 'tuned.json'} does not exist; run without --skip-tune first")
    # the meta-test takes the tuned.json just written (or kept), never whatever the config names
    tuned = dest / "tuned.json"
    tuned_arg = str(tuned.relative_to(ROOT)) if tuned.is_relative_to(ROOT) else str(tuned)
    cmd = [str(BIN / "metaloss-meta"), *common, f"meta_test.tuned={tuned_arg}", f"hydra.run.dir={work / 'meta'}"]
    record["meta"] = {"command": cmd[1:], "seconds": round(_run(cmd, work / "meta.log"), 1)}
    untuned = {loss: hp.get("source") for loss, hp in
               json.loads((work / "meta" / "comparison.json").read_text())["hyperparameters"].items()
               if loss != "learned" and hp.get("source") != f"tuned ({tuned_arg})"}
    if untuned:
        sys.exit(f"not recorded: baselines not trained with {tuned_arg}: {untuned} (see {work / 'meta.log'})")
    for name in RESULTS:
        if (work / "meta" / name).is_file():
            shutil.copy(work / "meta" / name, dest / name)
    record["work"] = str(work.relative_to(ROOT)) if work.is_relative_to(ROOT) else str(work)
    (dest / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    print((dest / "comparison.md").read_text())
    print(f"recorded in {dest}")


if __name__ == "__main__":
    main()

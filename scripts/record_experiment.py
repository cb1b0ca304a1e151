"""Record a hard-case experiment into experiments/<name>/: tune its baselines, meta-train and
meta-test the learned loss, and copy the results beside the config that made them.

    # tune, then meta-train + meta-test
    python scripts/record_experiment.py noise_sym40
    # reuse experiments/<name>/tuned.json
    python scripts/record_experiment.py noise_sym40 --skip-tune
    # rerun metaloss-meta, compare with the record
    python scripts/record_experiment.py noise_sym40 --verify

Both steps are the apps themselves (``metaloss-tune experiment=<name>`` and
``metaloss-meta experiment=<name>``), run as subprocesses from the repository root, so what
is recorded is exactly what a user reproduces with those two commands. Written to
experiments/<name>/: tuned.json; for each of the ``--meta-seeds`` meta-training runs (``seed=m``,
default 3) meta_seed_<m>/ with comparison.{json,md,png}, learned_vs_baselines.png and
learned_loss.{pt,png}; nested_comparison.{json,md} (the verdict over the runs,
metaloss.nested) and record.json (commands, wall times, the run directories). The previous
record moves to history/<when it started>/ (every record whose test scores were seen stays). A
meta-test on one data draw, or with a horizon other than meta-training's and no
meta_test.horizon_note, is not recorded (docs/protocol.md).
The meta-test is given ``meta_test.tuned=<dest>/tuned.json`` (the file just tuned, or the one
kept with ``--skip-tune``), and a comparison whose baselines did not all train with it is not
recorded. A failing step stops the script with its exit code; nothing is copied from a failed run,
and a meta stage that fails or is stopped (Ctrl-C, SIGTERM) puts the previous tuned.json back, so
experiments/<name>/ keeps one consistent record. The copy itself is all or nothing: every file is
staged beside its destination before any is renamed into place, so a full disk mid-copy leaves
the previous record whole. One run at a time per destination (a lock;
a second is refused). record.json's ``tune.tuned_sha256`` ties the tuning entry to its file:
``--skip-tune`` carries the entry over (marked ``reused``) only for that same tuned.json: the
previous record's, or, for a new variant of a case recorded with the case's tuned.json (e.g.
``binary99_warm``), the sibling record's that made it (named in ``from``).

``--verify`` reruns ``metaloss-meta experiment=<name> seed=<--meta-seed, default 0>`` (meta-training
and meta-test, with the destination's tuned.json, ``--dest`` included) into the work directory,
copies nothing, and compares every loss's per-seed values on the experiment's metric with the
record (a seed that diverged in both counts as equal; NaN on one side only is a difference):
exit 0 if none differs by more than ``--tolerance``, else exit 1 with the differences. The
default 1e-3 suits the machine that recorded (it reproduces bit for bit); on another CPU
per-seed values move further (up to 0.006 for outliers_robust and binary99's meta-tests under
the portable kernels: measure an experiment's spread with ``scripts/repro_spread.py`` and pass
about twice it).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _app(name: str) -> str:
    """The installed console script beside this interpreter, or a clear stop if there is none."""
    path = BIN / name
    if not path.is_file():
        sys.exit(
            f"{name} is not installed beside {sys.executable}: run this script with the "
            "project's interpreter (`. .venv/bin/activate` after `make setup`)"
        )
    return str(path)


def machine() -> dict:
    """What the record ran on: a 2000-step run on another CPU can take another trajectory
    (docs/protocol.md), so a record says which CPU made its numbers."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model here; platform.processor() is often empty or just the arch
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels ATen runs
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kept_tune_record(dest: Path) -> dict | None:
    """--skip-tune: the tuning entry (command, wall time) of the run that made the very
    tuned.json kept in ``dest`` (same sha256): dest's previous record's, else that of a sibling
    record (``dest/../*/record.json``: a variant of a case, e.g. ``binary99_warm``, recorded
    with its case's tuned.json), named in ``from``. A hand-placed tuned.json gets none."""
    sha = _sha256(dest / "tuned.json")
    own = dest / "record.json"
    others = sorted(p for p in dest.parent.glob("*/record.json") if p.parent != dest)
    for path in ([own] if own.is_file() else []) + others:
        try:
            kept = json.loads(path.read_text()).get("tune")
        except (OSError, ValueError):
            continue
        if not kept or kept.get("tuned_sha256") != sha:
            continue
        if path == own or kept.get("from"):  # a reused entry already names where it came from
            return {**kept, "reused": True}
        where = path.parent.relative_to(ROOT) if path.is_relative_to(ROOT) else path.parent
        return {
            **kept,
            "reused": True,
            "from": f"{where} (the same tuned.json: same task, model, optimizer and budget)",
        }
    return None


def _landed_with(dest: Path, tuned: Path) -> bool:
    """Whether dest's record is the one made with this tuned.json (its record.json names its
    sha256)."""
    try:
        entry = json.loads((dest / "record.json").read_text()).get("tune") or {}
        return tuned.is_file() and entry.get("tuned_sha256") == _sha256(tuned)
    except (OSError, ValueError):
        return False


def _lock(dest: Path):
    """One record at a time per destination: two would interleave their tuned.json and results."""
    f = open(dest / ".record.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(
            f"another record_experiment.py is writing or reading {dest}; wait for it to finish"
        )
    return f  # held until the process exits (the OS releases it even on SIGKILL)


RESULTS = [
    "comparison.json",
    "comparison.md",
    "comparison.png",
    "learned_vs_baselines.png",
    "learned_loss.pt",
    "learned_loss.png",
    "selection.json",  # with meta.selection.frac > 0: each candidate's held-out score
]


def _run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), f"(log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{cmd[0]} failed with exit code {rc}; see {log}")
    return time.perf_counter() - t0


def verify(args: argparse.Namespace, dest: Path, work: Path) -> int:
    """Rerun metaloss-meta as a user would, with the destination's own tuned.json, and compare
    per-seed results with the record (a seed that diverged in both is the same result)."""
    from metaloss.report import per_seed_differences

    if any(o.lstrip("+").startswith("meta_test.tuned=") for o in args.overrides):
        sys.exit(
            "--verify reruns with the record's own tuned.json (the destination's); "
            "drop meta_test.tuned= from the overrides"
        )
    if not (dest / "tuned.json").is_file():
        sys.exit(f"--verify: {dest / 'tuned.json'} does not exist; record {args.name} first")
    m = args.meta_seed
    nested_dir = dest / f"meta_seed_{m}"
    source = nested_dir / "comparison.json" if nested_dir.is_dir() else dest / "comparison.json"
    if not source.is_file() or (source.parent == dest and m != 0):
        sys.exit(f"--verify: no recorded meta-seed {m} in {dest}")
    recorded = json.loads(source.read_text())
    cmd = [
        _app("metaloss-meta"),
        f"experiment={args.name}",
        "progress=false",
        *args.overrides,
        f"seed={m}",
        f"meta_test.tuned={_arg(dest / 'tuned.json')}",
        f"hydra.run.dir={work / 'verify'}",
    ]
    seconds = _run(cmd, work / "verify.log")
    again = json.loads((work / "verify" / "comparison.json").read_text())
    metric = recorded["metric"]
    worst, bad = 0.0, []
    for loss, diffs in per_seed_differences(recorded, again, metric).items():
        if len(diffs) != len(recorded["results"][loss][metric]):
            bad.append(f"{loss}: not in the rerun, or another number of seeds")
            continue
        new = again["results"][loss][metric]
        for seed, d in enumerate(diffs):
            if d > args.tolerance:  # NaN on one side only is inf: a difference
                bad.append(
                    f"{loss} seed {seed}: {recorded['results'][loss][metric][seed]} recorded, "
                    f"{new[seed]} now"
                )
            worst = max(worst, d)
    print((work / "verify" / "comparison.md").read_text())
    if bad:
        print(
            f"NOT reproduced ({len(bad)} differences above {args.tolerance}):\n  "
            + "\n  ".join(bad)
        )
        return 1
    print(
        f"reproduced: every per-seed {metric} within {args.tolerance} of the record "
        f"(largest difference {worst:.3g}); {seconds:.0f} s"
    )
    return 0


def replace_all(files: dict[Path, Path]) -> None:
    """metaloss.runs.replace_all, imported once the apps are known to be installed."""
    from metaloss.runs import replace_all as transactional

    transactional(files)


def _arg(path: Path) -> str:
    """A path as the apps get it: relative to the repository root when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("name", help="a conf/experiment/<name>.yaml")
    ap.add_argument("--skip-tune", action="store_true", help="reuse experiments/<name>/tuned.json")
    ap.add_argument("--work", default="outputs/record", help="where the runs themselves go")
    ap.add_argument(
        "--dest", default=None, help="where the results go (default: experiments/<name>)"
    )
    ap.add_argument(
        "--verify", action="store_true", help="rerun metaloss-meta and compare with the record"
    )
    ap.add_argument(
        "--meta-seeds",
        type=int,
        default=3,
        help="meta-training runs (seed=0..N-1), each meta-tested on the same fresh draws "
        "(default 3)",
    )
    ap.add_argument(
        "--meta-seed", type=int, default=0, help="--verify: which meta-training run to rerun"
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="--verify: largest per-seed difference allowed",
    )
    ap.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for both apps (e.g. logger=none)"
    )
    args = ap.parse_intermixed_args()  # overrides may follow the options
    if args.meta_seeds < 2:
        sys.exit(
            f"--meta-seeds must be at least 2 (the spread between searches is part of the verdict; "
            f"the protocol records 3 or more), got {args.meta_seeds}"
        )
    if not (ROOT / "conf" / "experiment" / f"{args.name}.yaml").is_file():
        sys.exit(f"no experiment {args.name!r}: conf/experiment/{args.name}.yaml does not exist")
    for app in ("metaloss-tune", "metaloss-meta"):
        _app(app)  # the project's environment, checked first
    if not args.verify and (
        problems := protocol_problems(planned_protocol(args.name, args.overrides), args.name)
    ):
        sys.exit(
            "not recorded: the meta-test would depart from the protocol (docs/protocol.md):\n  "
            + "\n  ".join(problems)
        )
    dest = Path(args.dest).resolve() if args.dest else ROOT / "experiments" / args.name
    dest.mkdir(parents=True, exist_ok=True)
    lock = _lock(dest)  # noqa: F841  (kept open for the whole run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C
    work = (
        ROOT / args.work / f"{args.name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
    ).resolve()
    work.mkdir(parents=True)
    # The previous tuned.json is kept as a hard link beside it (no space needed) and renamed back
    # if the meta stage does not finish; every file reaches dest through replace_all (all files
    # staged beside their destination first, then renamed), so a full disk or a stop at any
    # point leaves the previous record whole.
    tuned = dest / "tuned.json"
    previous = dest / ".tuned.previous.json"
    if previous.is_file():  # an earlier run was killed (SIGKILL) before it cleaned up
        if _landed_with(dest, tuned):  # ... after its record landed: the kept copy is stale
            previous.unlink()
        else:  # ... in its meta stage: its previous tuned.json goes back
            os.replace(previous, tuned)
            print(
                f"restored {tuned} from an earlier run that was killed before it finished",
                flush=True,
            )
    if args.verify:
        sys.exit(verify(args, dest, work))
    record: dict = {
        "experiment": args.name,
        "overrides": args.overrides,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
    }
    common = [f"experiment={args.name}", "progress=false", *args.overrides]
    if not args.skip_tune:
        cmd = [
            _app("metaloss-tune"),
            *common,
            "meta_test.tuned=null",
            f"hydra.run.dir={work / 'tune'}",
        ]
        record["tune"] = {
            "command": cmd[1:],
            "seconds": round(_run(cmd, work / "tune.log"), 1),
            "tuned_sha256": _sha256(work / "tune" / "tuned.json"),
        }
        if tuned.is_file():
            os.link(tuned, previous)
        replace_all({tuned: work / "tune" / "tuned.json"})
    elif not tuned.is_file():
        sys.exit(f"--skip-tune: {tuned} does not exist; run without --skip-tune first")
    elif kept := _kept_tune_record(dest):
        record["tune"] = kept  # so the record still says what the kept tuning cost
    # the meta-test takes the tuned.json just written (or kept), never whatever the config names
    from metaloss.cli.logger import write_json
    from metaloss.nested import combine, format_nested

    tuned_arg = _arg(tuned)
    record["meta"] = []
    archived = None
    try:
        comparisons = []
        for m in range(args.meta_seeds):
            run_dir = work / f"meta_seed_{m}"
            cmd = [
                _app("metaloss-meta"),
                *common,
                f"seed={m}",
                f"meta_test.tuned={tuned_arg}",
                f"hydra.run.dir={run_dir}",
            ]
            record["meta"].append(
                {
                    "seed": m,
                    "command": cmd[1:],
                    "seconds": round(_run(cmd, work / f"meta_seed_{m}.log"), 1),
                }
            )
            comparison = json.loads((run_dir / "comparison.json").read_text())
            untuned = {
                loss: hp.get("source")
                for loss, hp in comparison["hyperparameters"].items()
                if loss != "learned" and hp.get("source") != f"tuned ({tuned_arg})"
            }
            if untuned:
                sys.exit(
                    f"not recorded: baselines not trained with {tuned_arg}: {untuned} "
                    f"(see {work / f'meta_seed_{m}.log'})"
                )
            if problems := protocol_problems(comparison.get("protocol") or {}, args.name):
                sys.exit(
                    "not recorded: the meta-test departs from the protocol (docs/protocol.md):\n  "
                    + "\n  ".join(problems)
                )
            comparisons.append(comparison)
        nested = combine(comparisons, list(range(args.meta_seeds)))
        write_json(work / NESTED, nested)
        (work / NESTED.replace(".json", ".md")).write_text(format_nested(nested) + "\n")
        record["work"] = _arg(work)
        (work / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        produced = {
            dest / f"meta_seed_{m}" / name: work / f"meta_seed_{m}" / name
            for m in range(args.meta_seeds)
            for name in RESULTS
            if (work / f"meta_seed_{m}" / name).is_file()
        }
        produced |= {
            dest / name: work / name
            for name in (NESTED, NESTED.replace(".json", ".md"), "record.json")
        }
        # the tuned.json the previous record used: the one kept beside it while re-tuning, or,
        # with --skip-tune, the one both records use (a new tuning with no old file keeps none)
        archived = archive_previous(
            dest, keep_tuned=previous if previous.is_file() else (tuned if args.skip_tune else None)
        )
        for m in range(args.meta_seeds):
            (dest / f"meta_seed_{m}").mkdir(exist_ok=True)
        replace_all(produced)
    except BaseException:  # failed, Ctrl-C, SIGTERM, a full disk: leave dest as it was
        if archived is not None:
            restore_archive(dest, archived)
        if not args.skip_tune:
            if previous.is_file():
                os.replace(previous, tuned)
            else:
                tuned.unlink(missing_ok=True)
        raise
    previous.unlink(missing_ok=True)
    print((dest / NESTED.replace(".json", ".md")).read_text())
    print(f"recorded in {dest}" + (f"; the previous record is in {archived}" if archived else ""))


NESTED = "nested_comparison.json"


def planned_protocol(name: str, overrides: list[str]) -> dict:
    """The protocol record the meta-test will write (``protocol_record``, the one source of
    truth), from the composed config alone: checked before any tuning or meta-training runs.
    Instantiating the task (to know whether it is a family) is the only work done."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from metaloss.cli.comparison import protocol_record
    from metaloss.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="meta", overrides=[f"experiment={name}", *overrides])
    mc = cfg.meta
    horizon = (
        int(mc.inner_steps) if mc.mode == "offline" else int(mc.steps)
    )  # as metaloss-meta says it
    return protocol_record(cfg, instantiate(cfg.task), {}, horizon)


def protocol_problems(protocol: dict, name: str) -> list[str]:
    """What keeps a meta-test from being a record (docs/protocol.md): one data draw for every
    seed, or a horizon that differs from meta-training's without a stated reason."""
    found = []
    if protocol.get("fresh_draws") is not True:
        found.append(
            "meta_test.fresh_draws is false: every seed trained on the meta-training draw "
            f"(set meta_test.fresh_draws: true in conf/experiment/{name}.yaml)"
        )
    if protocol.get("horizon_matched") is False and not protocol.get("horizon_note"):
        found.append(
            f"the loss was meta-trained for {protocol.get('meta_training_horizon')} "
            "inner steps and is "
            f"tested for {protocol.get('meta_test_steps')}: match them, or state why in "
            f"meta_test.horizon_note (conf/experiment/{name}.yaml)"
        )
    return found


def archive_previous(dest: Path, keep_tuned: Path | None) -> Path | None:
    """Move the previous record's results (and the tuned.json it used) into
    ``dest/history/<its start time>/``: every configuration whose test score was seen stays.
    All or nothing: the tuned.json is hard-linked first (no space needed), the moves are
    renames with Ctrl-C / SIGTERM held, and a failure puts back what was moved."""
    if (dest / "record.json").is_file():
        started = json.loads((dest / "record.json").read_text()).get("started", "unknown")
    elif (dest / "comparison.json").is_file():  # a record made before record.json existed
        started = "before_" + time.strftime(
            "%Y-%m-%d", time.localtime((dest / "comparison.json").stat().st_mtime)
        )
    else:
        return None
    target = dest / "history" / str(started).replace(" ", "_").replace(":", "-")
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('+')[0]}+{n}")
        n += 1
    target.mkdir(parents=True)
    names = [*RESULTS, NESTED, NESTED.replace(".json", ".md"), "record.json"]
    names += [p.name for p in dest.glob("meta_seed_*") if p.is_dir()]
    moved = []
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if keep_tuned is not None and keep_tuned.is_file():
            os.link(keep_tuned, target / "tuned.json")
        for name in names:
            if (dest / name).exists():
                os.replace(dest / name, target / name)
                moved.append(name)
    except BaseException:
        for name in moved:
            os.replace(target / name, dest / name)
        shutil.rmtree(target)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return target


def restore_archive(dest: Path, archived: Path) -> None:
    """Put an archived record back (the new one did not land), with Ctrl-C / SIGTERM held;
    the new record's empty run directories go."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for new in dest.glob("meta_seed_*"):
            if new.is_dir() and not (archived / new.name).exists() and not any(new.iterdir()):
                new.rmdir()
        for p in archived.iterdir():
            if p.name != "tuned.json":
                if p.is_dir() and (dest / p.name).exists():
                    shutil.rmtree(dest / p.name)
                os.replace(p, dest / p.name)
        shutil.rmtree(archived)
        if not any((dest / "history").iterdir()):
            (dest / "history").rmdir()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


if __name__ == "__main__":
    main()

"""How far a recorded meta-test moves when the same code runs on other CPU kernels.

    python scripts/repro_spread.py outliers_robust binary99            # all kernel paths below
    python scripts/repro_spread.py binary99 --paths default avx2-1t    # a subset

A recorded experiment (experiments/<name>/comparison.json) is re-run with ``metaloss-eval``
(the recorded learned loss and tuned.json) under several CPU code paths that another machine
would take: ATen's vectorised kernels at another instruction set (``ATEN_CPU_CAPABILITY``),
MKL's (``MKL_ENABLE_INSTRUCTIONS``, ``MKL_CBWR``) and another thread count. Each prints, per
loss, the largest per-seed difference from the record on the experiment's metric; the last
line is JSON with the largest difference per experiment and path, which is what the
tolerance of tests/test_recorded_experiments.py is set from (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# name -> (environment, torch threads). "default" is this machine as it is.
PATHS: dict[str, tuple[dict[str, str], int]] = {
    "default": ({}, 1),
    "default-2t": ({}, 2),
    "avx2-1t": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1),
    "sse-1t": (
        {
            "ATEN_CPU_CAPABILITY": "default",
            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
            "MKL_CBWR": "COMPATIBLE",
        },
        1,
    ),
}


def run_path(name: str, path: str, work: Path) -> dict[str, float]:
    env_extra, threads = PATHS[path]
    d = ROOT / "experiments" / name
    out_dir = work / f"{name}-{path}"
    env = {**os.environ, **env_extra, "WANDB_SILENT": "true"}
    cmd = [
        str(BIN / "metaloss-eval"),
        f"experiment={name}",
        f"loss_path={d / 'learned_loss.pt'}",
        "logger=none",
        "progress=false",
        f"threads={threads}",
        f"hydra.run.dir={out_dir}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} on {path} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    from metaloss.report import per_seed_differences

    per_seed = per_seed_differences(
        json.loads((d / "comparison.json").read_text()),
        json.loads((out_dir / "comparison.json").read_text()),
    )
    diffs = {loss: max(v) for loss, v in per_seed.items()}
    print(
        f"{name:16s} {path:10s} {time.perf_counter() - t0:6.0f} s  largest per-seed difference "
        f"{max(diffs.values()):.3g}  " + " ".join(f"{k}={v:.2g}" for k, v in sorted(diffs.items())),
        flush=True,
    )
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("names", nargs="+", help="recorded experiments (experiments/<name>/)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    args = ap.parse_args()
    summary: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            summary[name] = {p: max(run_path(name, p, Path(tmp)).values()) for p in args.paths}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

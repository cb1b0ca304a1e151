"""Benchmark long inner horizons: time and peak memory of one hypergradient for K inner steps.

Methods: ``unrolled`` (reverse mode through all K steps), ``checkpointed`` (the same
gradient, recomputed in ⌈√K⌉-step segments), ``implicit`` (CG at θ_K, no graph through the
run), ``es`` (antithetic ES, forward passes only), and ``plain`` — K ordinary training steps
per task (fixed MSE, torch.optim.SGD), the unit of every ratio. Sine regression as in ML3
(MLP 1-40-40-1, ML3 loss 2-50-50-1, 100 points, full batch), T tasks.

Each measurement runs in its own subprocess, so peak memory is not polluted by the others:
CUDA max allocated, or on the CPU the growth of the peak resident set (VmHWM) over the
set-up's resident size, warm-up call included.

    python scripts/bench_horizon.py  # K = 10, 100, 1000 (a few minutes on 2 cores)
    python scripts/bench_horizon.py --ks 10,100 --only implicit,plain --tasks 2

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _bench_common import reset_peak_rss, setup, status_kib  # scripts/ is on sys.path

METHODS = ("plain", "unrolled", "checkpointed", "implicit", "es")


def _hypergrad(method: str):
    from metaloss.hypergrad.checkpointed import Checkpointed
    from metaloss.hypergrad.es import EvolutionStrategies
    from metaloss.hypergrad.implicit import Implicit
    from metaloss.hypergrad.unrolled import Unrolled

    return {
        "unrolled": Unrolled,
        "checkpointed": Checkpointed,
        # a few CG steps, damped: the ML3 inner problem is not convex
        "implicit": lambda: Implicit(solver="cg", iterations=10, damping=0.1),
        "es": lambda: EvolutionStrategies(population=2, sigma=0.05),
    }[method]()


def worker(n_tasks: int, k: int, method: str, device: str, repeats: int) -> dict:
    """One measurement: seconds per call (median of ``repeats``) and peak memory in MiB."""
    import statistics

    import torch

    from metaloss.losses import fixed

    problem, meta, batch, _ = setup("sine", n_tasks, k, device)
    if method == "plain":

        def call():
            for t in range(n_tasks):
                m = problem.model
                opt = torch.optim.SGD(m.parameters(), lr=0.01)
                for j in range(k):
                    loss = fixed.mse(m(batch.x_train[t, j]), batch.y_train[t, j]).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    else:
        fn = _hypergrad(method)

        def call():
            out = fn(problem, meta, batch)
            float(out.loss)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = reset_peak_rss()
    call()  # warm-up; its memory peak counts (allocators keep memory after)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = max(0, status_kib("VmHWM") - rss0) / 1024
    return {"seconds": statistics.median(times), "peak_mib": peak}


def _measure(args, k: int, method: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(args.tasks),
        str(k),
        method,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"K={k}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if b and b > 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ks", default="10,100,1000", help="comma-separated inner horizons K")
    ap.add_argument("--only", default=None, help=f"comma-separated methods of {','.join(METHODS)}")
    ap.add_argument("--tasks", type=int, default=4, help="T tasks per meta-batch")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", nargs=3, metavar=("T", "K", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        n_tasks, k, method = args.worker
        print(json.dumps(worker(int(n_tasks), int(k), method, args.device, args.repeats)))
        return
    import torch

    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(METHODS) if args.only else set()
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; valid: {','.join(METHODS)}")
    ks = [int(k) for k in args.ks.split(",")]
    print(
        f"torch {torch.__version__} | device {args.device} | threads {torch.get_num_threads()} | "
        f"T={args.tasks} sine tasks | median of {args.repeats} (after one warm-up)"
    )
    print(
        f"{'K':>6} {'method':<14}{'s/call':>10}{'peak MiB':>10}{'time/plain':>12}{'mem/plain':>11}"
    )
    res: dict[str, dict[str, dict]] = {}
    for k in ks:
        row = res.setdefault(str(k), {})
        for m in methods:
            row[m] = _measure(args, k, m)
        plain = row.get("plain")
        for m in methods:
            r = row[m]
            if plain:
                r["time_vs_plain"] = _ratio(r["seconds"], plain["seconds"])
                r["memory_vs_plain"] = _ratio(r["peak_mib"], plain["peak_mib"])
                # the peak includes ~tens of MiB of one-off allocator/library growth that plain
                # training pays too; what a method adds on top of it:
                r["extra_mib_vs_plain"] = r["peak_mib"] - plain["peak_mib"]
            tr = f"{r['time_vs_plain']:.1f}x" if r.get("time_vs_plain") is not None else "-"
            mr = f"{r['memory_vs_plain']:.1f}x" if r.get("memory_vs_plain") is not None else "-"
            print(
                f"{k:>6} {m:<14}{r['seconds']:>10.3f}{r['peak_mib']:>10.1f}{tr:>12}{mr:>11}",
                flush=True,
            )
    goals = {}
    lo, hi = str(min(ks)), str(max(ks))
    if "implicit" in methods and lo != hi:
        goals["implicit_memory_Kmax_vs_Kmin"] = _ratio(
            res[hi]["implicit"]["peak_mib"], res[lo]["implicit"]["peak_mib"]
        )
    if "checkpointed" in methods and "unrolled" in methods:
        goals["checkpointed_vs_unrolled_memory_Kmax"] = _ratio(
            res[hi]["checkpointed"]["peak_mib"], res[hi]["unrolled"]["peak_mib"]
        )
        if "plain" in methods:
            goals["checkpointed_vs_unrolled_extra_memory_Kmax"] = _ratio(
                res[hi]["checkpointed"]["extra_mib_vs_plain"],
                res[hi]["unrolled"]["extra_mib_vs_plain"],
            )
    print(
        json.dumps(
            {
                "device": args.device,
                "torch": torch.__version__,
                "tasks": args.tasks,
                "ks": ks,
                "results": res,
                "goals": goals,
            }
        )
    )


if __name__ == "__main__":
    main()

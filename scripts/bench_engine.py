"""Benchmark one meta-step of the metaloss engine against a per-task `higher` loop.

Same work on both sides: T tasks, K inner steps, the same loss/model/data, the same
hypergradient (their parity is tested in tests/test_hypergrad.py). Each measurement runs in
its own subprocess so that peak memory (CUDA: max allocated; CPU: peak RSS growth) is not
polluted by the other. Also times K plain training steps (fixed MSE/CE loss, torch.optim)
on the same batches, to show what a meta-step costs relative to ordinary training.

    python scripts/bench_engine.py                       # CPU, eager
    python scripts/bench_engine.py --device cuda --compile

The last line printed is one JSON object with every measured ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _bench_common import reset_peak_rss, setup, status_kib  # scripts/ is on sys.path

CONFIGS = [  # name, task, T, K
    ("sine_T8_K5", "sine", 8, 5),
    ("sine_T8_K20", "sine", 8, 20),
    ("sine_T32_K5", "sine", 32, 5),
    ("sine_T32_K20", "sine", 32, 20),
    ("mnist1d_T8_K5", "mnist1d", 8, 5),
]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(task_name: str, n_tasks: int, k: int, method: str, device: str, repeats: int) -> dict:
    """One measurement: seconds per call (median of ``repeats``) and peak memory in MiB."""
    import statistics

    import torch

    from metaloss.hypergrad.higher_backend import HigherBackend
    from metaloss.hypergrad.unrolled import Unrolled

    problem, meta, batch, plain_loss = setup(task_name, n_tasks, k, device)

    if method == "plain":  # K ordinary training steps per task, torch.optim.SGD, fixed loss

        def call():
            for t in range(n_tasks):
                m = problem.model
                opt = torch.optim.SGD(m.parameters(), lr=0.01)
                for j in range(k):
                    loss = plain_loss(m(batch.x_train[t, j]), batch.y_train[t, j]).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    else:
        fn = {
            "engine": Unrolled(),
            "engine_compiled": Unrolled(compile=True),
            "higher": HigherBackend(),
        }[method]

        def call():
            out = fn(problem, meta, batch)
            float(out.loss)

    compile_s = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = reset_peak_rss()
    t0 = time.perf_counter()
    call()  # warm-up (and compilation); its memory peak counts: allocators keep memory after
    _sync(device)
    if method == "engine_compiled":
        compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # growth of the resident-set high-water mark over the set-up's resident size
        peak = max(0, status_kib("VmHWM") - rss0) / 1024
    return {"seconds": statistics.median(times), "peak_mib": peak, "compile_seconds": compile_s}


def _measure(args, name, task, n_tasks, k, method) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        task,
        str(n_tasks),
        str(k),
        method,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{name}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd engine")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument(
        "--worker", nargs=4, metavar=("TASK", "T", "K", "METHOD"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.worker:
        task, n_tasks, k, method = args.worker
        print(json.dumps(worker(task, int(n_tasks), int(k), method, args.device, args.repeats)))
        return
    import torch

    methods = ["higher", "engine"] + (["engine_compiled"] if args.compile else []) + ["plain"]
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only.split(",")]
    print(
        f"torch {torch.__version__} | device {args.device} | threads {torch.get_num_threads()} | "
        f"median of {args.repeats}"
    )
    print(f"{'config':<16}{'method':<17}{'s/meta-step':>12}{'peak MiB':>10}{'vs higher':>11}")
    print(
        "(peak MiB: CUDA max allocated, or CPU peak-RSS growth over set-up, warm-up call included;"
        " 'plain' = K ordinary steps per task with a fixed loss)"
    )
    ratios = {}
    for name, task, n_tasks, k in configs:
        res = {m: _measure(args, name, task, n_tasks, k, m) for m in methods}
        for m in methods:
            r = res["higher"]["seconds"] / res[m]["seconds"]
            extra = (
                f"  (compile {res[m]['compile_seconds']:.1f}s)" if res[m]["compile_seconds"] else ""
            )
            print(
                f"{name:<16}{m:<17}{res[m]['seconds']:>12.4f}{res[m]['peak_mib']:>10.1f}{r:>10.2f}x{extra}"
            )
        ratios[name] = {
            "speedup_engine_vs_higher": res["higher"]["seconds"] / res["engine"]["seconds"],
            "meta_step_vs_plain_K_steps": res["engine"]["seconds"] / res["plain"]["seconds"],
            "memory_engine_vs_higher": (
                res["engine"]["peak_mib"] / res["higher"]["peak_mib"]
                if res["higher"]["peak_mib"] > 0
                else None
            ),
        }
        if args.compile:
            ratios[name]["speedup_compiled_vs_higher"] = (
                res["higher"]["seconds"] / res["engine_compiled"]["seconds"]
            )
    print(json.dumps({"device": args.device, "torch": torch.__version__, "ratios": ratios}))


if __name__ == "__main__":
    main()

"""Benchmark the meta-test: the per-model loop against the vectorised path (one vmap over
seeds x tasks per loss), side by side in one process, on the same work.

    python scripts/bench_metatest.py                 # CPU, both configurations
    python scripts/bench_metatest.py --device cuda

Configurations (the real meta-test settings of the recorded experiments):
* ``quickstart``: ML3's sine meta-test - 4 losses (an ML3 loss, mse, mae, huber), 5 seeds x 10
  fresh test tasks = 50 models per loss, 100 full-batch SGD steps, MLP 1-100-10-1.
* ``mnist1d``: 5 losses (TaylorGLO, ce, focal, label smoothing, Poly-1), 5 seeds, MLP
  40-100-100-10, SGD on minibatches of 100 (``--mnist1d-steps``, default 300 of the
  experiment's 2000 to keep the run short; the ratio does not depend on it).

Timings alternate loop / vectorised ``--repeats`` times and report medians. The last line
printed is one JSON object with the ratios (loop seconds / vectorised seconds).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time


def _quickstart(device: str):
    from metaloss.config import loss_option
    from metaloss.inner.optimizers import sgd
    from metaloss.losses.mlp import ML3Loss
    from metaloss.models import mlp
    from metaloss.tasks.regression import sine

    lr = 0.001
    test = {"amplitude": (0.2, 5.0), "phase": (-3.14159, 3.14159), "x_range": (-5.0, 5.0)}

    def tasks_for_seed(seed):
        return [sine(seed=10_000 + seed * 10 + i, **test).to(device) for i in range(10)]

    base = tasks_for_seed(0)[0]
    losses = {
        "learned": ML3Loss(hidden=(50, 50), bias=False, init="xavier")
        .to(device)
        .requires_grad_(False),
        **{n: loss_option(n, base) for n in ("mse", "mae", "huber")},
    }
    return dict(
        tasks_for_seed=tasks_for_seed,
        factory=functools.partial(mlp, hidden=[100, 10]),
        losses=losses,
        opt=sgd(lr=lr),
        steps=100,
        batch_size=None,
    )


def _mnist1d(device: str, steps: int):
    from metaloss.config import loss_option
    from metaloss.inner.optimizers import sgd
    from metaloss.losses.taylor import TaylorGLO
    from metaloss.models import mlp
    from metaloss.tasks.classification import mnist1d

    task = mnist1d().to(device)
    losses = {
        "learned": TaylorGLO().to(device).requires_grad_(False),
        **{n: loss_option(n, task) for n in ("ce", "focal", "label_smoothing", "poly1")},
    }
    return dict(
        tasks_for_seed=lambda seed: [task],
        factory=functools.partial(mlp, hidden=[100, 100]),
        losses=losses,
        opt=sgd(lr=0.1),
        steps=steps,
        batch_size=100,
    )


def _time(fn, sync) -> tuple[float, dict]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["quickstart", "mnist1d"], default=None)
    ap.add_argument("--mnist1d-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from metaloss.metatest import compare_losses

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    configs = {
        "quickstart": lambda: _quickstart(args.device),
        "mnist1d": lambda: _mnist1d(args.device, args.mnist1d_steps),
    }
    ratios = {}
    for name, make in configs.items():
        if args.only and name != args.only:
            continue
        c = make()
        make_opt = functools.partial(c["opt"].torch_equivalent.func, **c["opt"].hparams)
        kw = dict(
            seeds=list(range(5)), steps=c["steps"], batch_size=c["batch_size"], progress=False
        )
        run_loop = functools.partial(
            compare_losses, c["tasks_for_seed"], c["factory"], c["losses"], make_opt, **kw
        )
        run_vec = functools.partial(run_loop, vectorised=c["opt"])
        loop_t, vec_t = [], []
        for _ in range(args.repeats):
            t, loop = _time(run_loop, sync)
            loop_t.append(t)
            t, vec = _time(run_vec, sync)
            vec_t.append(t)
        lm, vm = statistics.median(loop_t), statistics.median(vec_t)
        key = "test/mse" if name == "quickstart" else "test/acc"
        drift = max(abs(a - b) for n in loop for a, b in zip(loop[n][key], vec[n][key]))
        print(
            f"{name:11s} loop {lm:7.2f} s   vectorised {vm:7.2f} s   speed-up {lm / vm:5.1f}x   "
            f"max |loop - vec| on {key}: {drift:.2e}",
            flush=True,
        )
        ratios[name] = {
            "loop_s": round(lm, 3),
            "vectorised_s": round(vm, 3),
            "speedup": round(lm / vm, 2),
        }
    result = {
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "ratios": ratios,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

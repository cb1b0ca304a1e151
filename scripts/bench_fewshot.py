"""Benchmark MAML's meta-training step: the vectorised meta-batch vs a per-task Python loop.

One meta-gradient of the mean query loss over a meta-batch of 5-way episodes of the offline
few-shot benchmark (``fewshot_mnist1d``; MLP 40-64-64-5, 5 second-order inner SGD steps), two
ways on the same episodes and meta-parameters:

* ``vmap``: :func:`metaloss.fewshot.maml.meta_gradient`, all episodes in one ``torch.vmap``
  of the inner loop under ``torch.func.grad_and_value``;
* ``loop``: :func:`metaloss.fewshot.maml.loop_objective` then ``.backward()``: one episode at a
  time with ``torch.autograd.grad(create_graph=True)``, the way MAML's and MeTAL's reference
  code runs.

Both give the same meta-gradient (the largest difference is printed). Each is timed
``--repeats`` times, interleaved, after a warm-up; medians are compared. The last line is
``speedup: <x>`` = loop time / vmap time for ``--loss`` (MeTAL by default; ``ce`` is MAML).
``--compile`` also times the vmapped step through ``torch.compile`` (``fewshot.compile=true``),
after its compilation (minutes, printed), and prints its ratio to the loop above the last line.

    python scripts/bench_fewshot.py                 # meta-batch 8, MeTAL, 5-way 1-shot
    python scripts/bench_fewshot.py --loss ce --meta-batch 32 --shot 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metaloss.fewshot.losses import MeTAL, PerExample
from metaloss.fewshot.maml import (
    FewShotProblem,
    compiled_meta_gradient,
    hidden_layers,
    initial_meta,
    loop_objective,
    meta_gradient,
)
from metaloss.losses.fixed import ce
from metaloss.models import mlp
from metaloss.tasks.episodes import fewshot_mnist1d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="inner steps")
    ap.add_argument("--loss", choices=["metal", "ce"], default="metal")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time the vmapped step through torch.compile (fewshot.compile; minutes)",
    )
    args = ap.parse_args()
    for key in ("meta_batch", "shot", "steps", "repeats"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} = {getattr(args, key)}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads = {args.threads}: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    episodes = fewshot_mnist1d(shot=args.shot, query=15)
    model = mlp(in_shape=episodes.in_shape, out_dim=5, hidden=[64, 64])
    if args.loss == "metal":
        loss = MeTAL(out_dim=5, layers=hidden_layers(model), steps=args.steps)
    else:
        loss = PerExample(ce)
    problem = FewShotProblem(model, loss, "classification", steps=args.steps, inner_lr=0.4)
    meta = initial_meta(model, loss)
    # move the loss off its exact-MAML start so every meta-parameter has a gradient
    gen = torch.Generator().manual_seed(1)
    meta = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in meta.items()}
    batch = episodes.sample("train", args.meta_batch, 0)

    def vmap_way():
        return meta_gradient(problem, meta, batch)[0]

    def loop_way():
        m = {k: v.clone().requires_grad_() for k, v in meta.items()}
        loop_objective(problem, m, batch).backward()
        return {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in m.items()}

    print(
        f"{args.loss}: meta-batch {args.meta_batch} × 5-way {args.shot}-shot (15 query), "
        f"{args.steps} inner steps, MLP 40-64-64-5, threads {torch.get_num_threads()}"
    )
    ways = {"vmap": vmap_way, "loop": loop_way}
    if args.compile:
        compiled = compiled_meta_gradient(problem)
        t0 = time.perf_counter()
        compiled(meta, batch)
        print(f"torch.compile: {time.perf_counter() - t0:.1f} s to compile (once per run)")
        ways["compiled"] = lambda: compiled(meta, batch)[0]
    for fn in ways.values():  # warm-up: vmap's first call, the allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    grads = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            grads[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        print(
            f"{name:<5} {t * 1e3:8.1f} ms per meta-step   ({args.meta_batch / t:7.1f} episodes/s)"
        )
    for name in [n for n in ways if n != "vmap"]:
        diff = max(float((grads["vmap"][k] - grads[name][k]).abs().max()) for k in meta)
        print(f"meta-gradient: max |vmap - {name}| = {diff:.3g}")
    if args.compile:
        print(f"speedup of compiled vs loop: {med['loop'] / med['compiled']:.2f}")
    print(f"speedup: {med['loop'] / med['vmap']:.2f}")


if __name__ == "__main__":
    main()

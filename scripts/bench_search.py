"""Benchmark one generation of the symbolic search's fitness: batched vs one at a time.

One generation of ``meta_optim=gp`` on MNIST-1D (MLP 40-100-100-10, SGD, minibatches of
100): P trees × T seeds × K inner steps, then the validation error of every model, three
ways on the same population (the search's own seeded first generation) and meta-batch:

* ``batched``: :func:`metaloss.gp.population_objective`, all P × T models in one loop;
* ``loop``: one candidate and one seed at a time, the way EvoMAL's code evaluates: a
  ``torch.nn`` model, ``loss.backward()`` and ``torch.optim.SGD`` (:func:`evomal_loop`);
* ``functional``: one candidate and one seed at a time through this engine's functional
  inner loop (:func:`metaloss.gp.sequential_objective`).

All three give the same fitness (the largest differences are printed). Each is timed once
after a short warm-up (``--repeats`` for more, interleaved). The last line is
``speedup: <x>`` = loop time / batched time; the functional ratio is printed above it.

    python scripts/bench_search.py                       # P=25, T=5, K=250 (the issue's size)
    python scripts/bench_search.py --pop 8 --seeds 2 --steps 20   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _bench_common import setup  # scripts/ is on sys.path

from metaloss.cmaes import OBJECTIVES
from metaloss.gp import GeneticProgramming, population_objective, sequential_objective
from metaloss.losses.symbolic import SymbolicLoss, to_text


def evomal_loop(problem, trees, batch) -> torch.Tensor:
    """The fitness of each tree, one candidate and one seed at a time with a plain PyTorch
    training loop (model module, ``backward``, ``torch.optim``): EvoMAL's way."""
    out = []
    n_tasks = batch.x_train.shape[0]
    for tree in trees:
        loss = SymbolicLoss(to_text(tree), max_nodes=len(tree), max_constants=len(tree))
        loss.requires_grad_(False)
        values = []
        for t in range(n_tasks):
            model = copy.deepcopy(problem.model)
            model.load_state_dict({k: v[t] for k, v in batch.theta0.items()}, strict=False)
            opt = problem.inner_opt.torch_equivalent(model.parameters())
            for k in range(problem.inner_steps):
                opt.zero_grad()
                loss(model(batch.x_train[t, k]), batch.y_train[t, k]).mean().backward()
                opt.step()
            with torch.no_grad():
                pred = model(batch.x_val[t])
                values.append(problem.objective(pred, batch.y_val[t]).mean())
        out.append(torch.stack(values).mean())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pop", type=int, default=25, help="trees per generation (P)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds (tasks) per tree (T)")
    ap.add_argument("--steps", type=int, default=250, help="inner steps (K)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problem, _, batch, _ = setup("mnist1d", args.seeds, args.steps, "cpu")
    problem.inner_opt = type(problem.inner_opt)(*problem.inner_opt)  # sgd(lr=0.01), as set up
    problem.objective = OBJECTIVES["error"]
    gp = GeneticProgramming(SymbolicLoss("mul(-1.0, mul(y, log(f)))"), popsize=args.pop, seed=0)
    trees = gp.population
    print(f"P={args.pop} trees × T={args.seeds} seeds × K={args.steps} steps, MNIST-1D MLP")
    for t in trees[:5]:
        print(f"  e.g. {to_text(t)}")
    small = batch._replace(x_train=batch.x_train[:, :2], y_train=batch.y_train[:, :2])
    warm = type(problem)(**{**problem.__dict__, "inner_steps": 2})
    population_objective(warm, trees, small)  # warm-up: vmap's first call, allocator
    sequential_objective(warm, trees[:2], small)
    evomal_loop(warm, trees[:2], small)
    ways = {
        "batched": population_objective,
        "loop": evomal_loop,
        "functional": sequential_objective,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    out = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            out[name] = fn(problem, trees, batch)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        print(f"{name:<11} {t:8.2f} s   ({args.pop * args.seeds / t:7.1f} inner runs/s)")
    a = out["batched"]
    for name in ("loop", "functional"):
        b = out[name]
        both = torch.isfinite(a) & torch.isfinite(b)
        same = bool(torch.equal(torch.isfinite(a), torch.isfinite(b)))
        diff = float((a[both] - b[both]).abs().max()) if both.any() else float("nan")
        print(f"fitness: max |batched - {name}| = {diff:.3g}; same diverged trees: {same}")
    print(f"speedup vs functional one at a time: {med['functional'] / med['batched']:.2f}")
    print(f"speedup: {med['loop'] / med['batched']:.2f}")


if __name__ == "__main__":
    main()

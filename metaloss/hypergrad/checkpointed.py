"""Unrolled hypergradient with segment checkpointing: long horizons in bounded memory.

The exact hypergradient of :class:`~metaloss.hypergrad.unrolled.Unrolled`, computed by
gradient checkpointing (Griewank & Walther, "Algorithm 799: revolve", 2000; Chen, Xu,
Zhang, Guestrin, "Training Deep Nets with Sublinear Memory Cost", 2016) of the inner
trajectory, written as a functional recompute:

1. forward sweep without a graph, keeping only (θ, optimizer state) at the start of each
   segment of ``segment`` inner steps;
2. reverse sweep, last segment first: recompute that segment with a graph (``torch.func.vjp``
   of the vmapped segment), pull the adjoint of (θ, state) back through it and add its
   contribution to dM/dφ, then free it.

Memory: ⌈K/s⌉ copies of (θ, state) plus one segment's graph, instead of K steps' graphs
(s = ⌈√K⌉ by default: O(√K)). Time: one extra forward pass over the K steps.
``torch.utils.checkpoint`` is not used because its saved-tensor hooks do not compose with
the ``torch.func`` transforms of the inner loop.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call
from torch.utils import _pytree as pytree

from metaloss.hypergrad.base import HyperGrad, MetaBatch, MetaProblem, Params, detach, run_steps


def _split(state):
    """An optimizer state as (its tensor leaves, a rebuild recipe with the other leaves)."""
    leaves, spec = pytree.tree_flatten(state)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    others = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    return tensors, (spec, others)


def _join(tensors, recipe):
    spec, others = recipe
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if o is None else o for o in others], spec)


class Checkpointed:
    """``segment``: inner steps per recomputed segment (None: ⌈√K⌉)."""

    def __init__(self, segment: int | None = None) -> None:
        if segment is not None and segment < 1:
            raise ValueError(
                f"checkpointed hypergradient needs segment >= 1 steps (or null), got {segment}"
            )
        self.segment = segment

    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        meta = detach(meta)
        k_steps = problem.inner_steps
        seg = self.segment or max(1, math.isqrt(max(k_steps - 1, 0)) + 1)
        bounds = list(range(0, k_steps, seg)) + [k_steps]
        xs, ys = batch.x_train, batch.y_train
        recipe = {}  # the non-tensor state leaves (step counters), identical across tasks

        def init_one(theta):
            tensors, recipe["r"] = _split(problem.inner_opt.init(theta))
            return tensors

        def segment(theta, tensors, m, a, b, rec):
            def one(th, st, x, y):
                th, state = run_steps(problem, m, th, _join(st, rec), x, y, a, b)
                tensors, recipe["r"] = _split(state)
                return th, tensors

            return torch.vmap(one)(theta, tensors, xs, ys)

        # forward sweep: no graph, (θ, state) kept at each segment's start
        theta = detach(batch.theta0)
        with torch.no_grad():
            tensors = torch.vmap(init_one)(theta)
            starts = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                starts.append((theta, tensors, recipe["r"]))
                theta, tensors = segment(theta, tensors, meta, a, b, recipe["r"])

        def objective(th):
            def one(t, x, y):
                pred = functional_call(problem.model, t, (x,))
                return problem.objective(pred, y, **problem.objective_context).mean()

            return torch.vmap(one)(th, batch.x_val, batch.y_val).mean()

        value, pull = torch.func.vjp(objective, theta)[:2]  # (output, pullback)
        (g_theta,) = pull(torch.ones_like(value))
        g_state = [torch.zeros_like(t) for t in tensors]
        grads = {k: torch.zeros_like(v) for k, v in meta.items()}
        # reverse sweep: recompute one segment with a graph, pull the adjoint through it
        for (a, b), (th_a, st_a, rec_a) in zip(
            reversed(list(zip(bounds[:-1], bounds[1:]))), reversed(starts)
        ):

            def seg_ab(th, st, m, a=a, b=b, rec=rec_a):
                return segment(th, st, m, a, b, rec)

            pull = torch.func.vjp(seg_ab, th_a, st_a, meta)[1]
            g_theta, g_state, g_meta = pull((g_theta, g_state))
            grads = {k: grads[k] + g_meta[k] for k in grads}
            del pull
        return HyperGrad(value.detach(), grads)

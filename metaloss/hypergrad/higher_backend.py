"""The same unrolled hypergradient through the ``higher`` library, one task at a time.

Grefenstette et al., "Generalized Inner Loop Meta-Learning", 2019 (arXiv:1910.01727).
This is how ML3's and EvoMAL's released code compute it; kept as a reference backend and
as the gradient oracle of the tests. Uses ``inner_opt.torch_equivalent`` as the
differentiable optimizer.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call

from metaloss.hypergrad.base import HyperGrad, MetaBatch, MetaProblem, Params, split_meta
from metaloss.losses.base import loss_context


class HigherBackend:
    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        import higher

        meta = {k: v.detach().requires_grad_() for k, v in meta.items()}
        phi, log_lr = split_meta(meta)
        keys = list(meta)
        n_tasks = batch.x_train.shape[0]
        total = torch.zeros((), dtype=batch.x_val.dtype, device=batch.x_val.device)
        grads = {k: torch.zeros_like(v) for k, v in meta.items()}
        for t in range(n_tasks):
            model = copy.deepcopy(problem.model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(batch.theta0[name][t])
            opt = problem.inner_opt.torch_equivalent(model.parameters())
            with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
                for k in range(problem.inner_steps):
                    x, y = batch.x_train[t, k], batch.y_train[t, k]
                    ctx = loss_context(problem.class_counts, x, k / problem.inner_steps)
                    inner = functional_call(problem.loss, phi, (fmodel(x), y), ctx).mean()
                    override = None if log_lr is None else {"lr": [log_lr.exp()]}
                    diffopt.step(inner, override=override)
                obj = (
                    problem.objective(
                        fmodel(batch.x_val[t]), batch.y_val[t], **problem.objective_context
                    ).mean()
                    / n_tasks
                )
            for key, g in zip(
                keys, torch.autograd.grad(obj, [meta[k] for k in keys], allow_unused=True)
            ):
                if g is not None:
                    grads[key] = grads[key] + g
            total = total + obj.detach()
        return HyperGrad(total, grads)

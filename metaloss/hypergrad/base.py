"""The functional core shared by the hypergradient methods.

Meta-parameters are one flat dict: ``loss.<name>`` for the loss's φ and, when the inner
learning rate is meta-learned, ``inner.log_lr``. Every method is called as
``method(problem, meta, batch) -> (meta_loss, grads)`` with ``grads`` keyed like ``meta``.

One outer step on T tasks (the data flow of DESIGN.md)::

    θ_{k+1} = opt.update(∇_θ mean ℓ_φ(f_θ(x_k), y_k))        k = 0..K-1, per task
    M(φ)    = mean_T  objective(f_{θ_K}(x_val), y_val)        validation split
    dM/dφ   by reverse mode through the K updates, vmapped over the T tasks
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss.inner.optimizers import InnerOptimizer
from metaloss.losses.base import loss_context

Params = dict[str, Tensor]
LOSS_PREFIX = "loss."
LR_KEY = "inner.log_lr"


@dataclass
class MetaProblem:
    """What an inner loop needs besides data: templates called through ``functional_call``."""

    model: nn.Module
    loss: nn.Module
    inner_opt: InnerOptimizer
    inner_steps: int
    objective: Callable[..., Tensor]  # per-example validation objective
    class_counts: Tensor | None = None  # training split's, for the inner loss
    objective_context: dict = field(default_factory=dict)  # e.g. validation class counts


class MetaBatch(NamedTuple):
    """T tasks stacked: θ0 ``[T, ...]``, inner batches ``[T, K, N, ...]``, val ``[T, M, ...]``."""

    theta0: Params
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


class HyperGrad(NamedTuple):
    loss: Tensor
    grads: Params


def meta_params(loss: nn.Module, log_lr: Tensor | None = None) -> Params:
    """The flat meta-parameter dict of a loss module (and a learned inner log-lr)."""
    meta: Params = {LOSS_PREFIX + n: p for n, p in loss.named_parameters()}
    if log_lr is not None:
        meta[LR_KEY] = log_lr
    return meta


def split_meta(meta: Params) -> tuple[Params, Tensor | None]:
    phi = {k[len(LOSS_PREFIX) :]: v for k, v in meta.items() if k.startswith(LOSS_PREFIX)}
    return phi, meta.get(LR_KEY)


def detach(tree: Params) -> Params:
    return {k: v.detach() for k, v in tree.items()}


def inner_loss(
    problem: MetaProblem, theta: Params, phi: Params, x: Tensor, y: Tensor, t: float
) -> Tensor:
    """Mean learned loss of the model at θ on one inner batch."""
    pred = functional_call(problem.model, theta, (x,))
    ctx = loss_context(problem.class_counts, x, t)
    return functional_call(problem.loss, phi, (pred, y), ctx).mean()


grad_theta = torch.func.grad(inner_loss, argnums=1)  # ∇θ of the inner loss, functional


def unroll(
    problem: MetaProblem,
    meta: Params,
    theta: Params,
    x_train: Tensor,
    y_train: Tensor,
    *,
    differentiable_from: int = 0,
    first_order: bool = False,
) -> Params:
    """K inner steps from θ0. Steps before ``differentiable_from`` see a detached φ (and
    the trajectory is cut there: truncated backprop); ``first_order`` drops the terms that
    flow through θ's own history (no Hessian-vector products), keeping ∂update/∂φ."""
    phi, lr = split_meta(meta)
    opt, k_steps = problem.inner_opt, problem.inner_steps
    state = opt.init(theta)
    for k in range(k_steps):
        live = k >= differentiable_from
        if k == differentiable_from and k > 0:
            theta = detach(theta)
        phi_k = phi if live else detach(phi)
        theta_in = detach(theta) if first_order else theta
        g = grad_theta(problem, theta_in, phi_k, x_train[k], y_train[k], k / k_steps)
        kw = {} if lr is None else {"lr": (lr if live else lr.detach()).exp()}
        theta, state = opt.update(g, state, theta, **kw)
    return theta


def task_objective(
    problem: MetaProblem,
    meta: Params,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    **unroll_kw,
) -> Tensor:
    theta = unroll(problem, meta, theta0, x_train, y_train, **unroll_kw)
    pred = functional_call(problem.model, theta, (x_val,))
    return problem.objective(pred, y_val, **problem.objective_context).mean()


def batched_objective(problem: MetaProblem, meta: Params, batch: MetaBatch, **unroll_kw) -> Tensor:
    """Mean validation objective over the T tasks, vectorised with ``vmap``."""

    def one(theta0, xt, yt, xv, yv):
        return task_objective(problem, meta, theta0, xt, yt, xv, yv, **unroll_kw)

    return torch.vmap(one)(
        batch.theta0, batch.x_train, batch.y_train, batch.x_val, batch.y_val
    ).mean()


def functional_hypergrad(
    problem: MetaProblem, meta: Params, batch: MetaBatch, **unroll_kw
) -> HyperGrad:
    """grad(vmap(inner loops)): fully functional, so it can be ``torch.compile``-d."""
    grads, value = torch.func.grad_and_value(
        lambda m: batched_objective(problem, m, batch, **unroll_kw)
    )(detach(meta))
    return HyperGrad(value, grads)


def run_steps(
    problem: MetaProblem,
    meta: Params,
    theta: Params,
    state,
    x_train: Tensor,
    y_train: Tensor,
    start: int,
    stop: int,
) -> tuple[Params, object]:
    """Inner steps ``start..stop-1`` of :func:`unroll` (all of them live) from a given
    (θ, optimizer state): the unit that checkpointed unrolling recomputes segment by segment.
    ``x_train``/``y_train`` hold all K batches; step k reads batch k and progress k / K."""
    phi, lr = split_meta(meta)
    opt, k_steps = problem.inner_opt, problem.inner_steps
    kw = {} if lr is None else {"lr": lr.exp()}
    for k in range(start, stop):
        g = grad_theta(problem, theta, phi, x_train[k], y_train[k], k / k_steps)
        theta, state = opt.update(g, state, theta, **kw)
    return theta, state

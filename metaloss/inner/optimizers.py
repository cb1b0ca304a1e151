"""Differentiable inner optimizers as pure ``(init, update)`` pairs over parameter dicts.

``init(params) -> state`` and ``update(grads, state, params, *, lr=None) -> (params, state)``
never mutate anything, so reverse-mode differentiation (and ``vmap``) flows through them.
Each one reproduces the update rule of ``torch.optim.<X>`` (oracle-tested), and
``torch_equivalent(params)`` builds that optimizer (used by the ``higher`` backend and the
meta-test). Where the square root of a second moment is differentiated, a tiny floor sits
*inside* the root: d sqrt(v)/dv is infinite at v = 0, and with zero gradients that gives
NaN meta-gradients (as in ``higher``'s Adam); the floor changes the forward value by
at most 1e-15. ``lr`` may be overridden per call by a tensor (a meta-learned learning rate).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch

Params = dict[str, torch.Tensor]
SQRT_FLOOR = 1e-30


class InnerOptimizer(NamedTuple):
    name: str
    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    hparams: dict
    torch_equivalent: Callable[..., torch.optim.Optimizer]


class Step(NamedTuple):
    step: int


class MomentumState(NamedTuple):
    step: int
    buf: Params


class AccState(NamedTuple):
    step: int
    acc: Params


class AdadeltaState(NamedTuple):
    step: int
    square_avg: Params
    acc_delta: Params


class AdamState(NamedTuple):
    step: int
    m: Params
    v: Params


class NAdamState(NamedTuple):
    step: int
    m: Params
    v: Params
    mu_product: float


def _zeros(params: Params) -> Params:
    return {k: torch.zeros_like(p) for k, p in params.items()}


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(v + SQRT_FLOOR)


def _decay(grads: Params, params: Params, wd: float) -> Params:
    return grads if not wd else {k: g + wd * params[k] for k, g in grads.items()}


def _make(name, init, update, torch_cls, **hp) -> InnerOptimizer:
    return InnerOptimizer(name, init, update, hp, partial(torch_cls, **hp))


def sgd(*, lr: float = 0.01, weight_decay: float = 0.0) -> InnerOptimizer:
    """Plain gradient descent."""

    def update(grads, state, params, *, lr=lr):
        grads = _decay(grads, params, weight_decay)
        return {k: p - lr * grads[k] for k, p in params.items()}, Step(state.step + 1)

    return _make(
        "sgd", lambda p: Step(0), update, torch.optim.SGD, lr=lr, weight_decay=weight_decay
    )


def _heavy_ball(name: str, nesterov: bool, lr, momentum, dampening, weight_decay):
    def update(grads, state, params, *, lr=lr):
        grads = _decay(grads, params, weight_decay)
        if state.step == 0:  # torch starts the buffer at the first gradient
            buf = dict(grads)
        else:
            buf = {k: momentum * state.buf[k] + (1 - dampening) * g for k, g in grads.items()}
        direction = {k: g + momentum * buf[k] for k, g in grads.items()} if nesterov else buf
        return (
            {k: p - lr * direction[k] for k, p in params.items()},
            MomentumState(state.step + 1, buf),
        )

    return _make(
        name,
        lambda p: MomentumState(0, _zeros(p)),
        update,
        torch.optim.SGD,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )


def momentum(
    *, lr: float = 0.01, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0
) -> InnerOptimizer:
    """SGD with heavy-ball momentum (Polyak 1964), torch.optim.SGD's formulation."""
    return _heavy_ball("momentum", False, lr, momentum, dampening, weight_decay)


def nesterov(
    *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0
) -> InnerOptimizer:
    """SGD with Nesterov momentum (Sutskever et al. 2013), torch.optim.SGD(nesterov=True)."""
    return _heavy_ball("nesterov", True, lr, momentum, 0.0, weight_decay)


def adagrad(
    *,
    lr: float = 0.01,
    lr_decay: float = 0.0,
    eps: float = 1e-10,
    initial_accumulator_value: float = 0.0,
) -> InnerOptimizer:
    """Adagrad (Duchi et al. 2011)."""

    def init(params):
        return AccState(
            0, {k: torch.full_like(p, initial_accumulator_value) for k, p in params.items()}
        )

    def update(grads, state, params, *, lr=lr):
        step = state.step + 1
        acc = {k: state.acc[k] + g * g for k, g in grads.items()}
        clr = lr / (1 + (step - 1) * lr_decay)
        new = {k: p - clr * grads[k] / (_sqrt(acc[k]) + eps) for k, p in params.items()}
        return new, AccState(step, acc)

    return _make(
        "adagrad",
        init,
        update,
        torch.optim.Adagrad,
        lr=lr,
        lr_decay=lr_decay,
        eps=eps,
        initial_accumulator_value=initial_accumulator_value,
    )


def rmsprop(*, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8) -> InnerOptimizer:
    """RMSprop (Tieleman & Hinton 2012), torch's formulation (eps outside the root)."""

    def update(grads, state, params, *, lr=lr):
        sq = {k: alpha * state.acc[k] + (1 - alpha) * g * g for k, g in grads.items()}
        new = {k: p - lr * grads[k] / (_sqrt(sq[k]) + eps) for k, p in params.items()}
        return new, AccState(state.step + 1, sq)

    return _make(
        "rmsprop",
        lambda p: AccState(0, _zeros(p)),
        update,
        torch.optim.RMSprop,
        lr=lr,
        alpha=alpha,
        eps=eps,
    )


def adadelta(*, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6) -> InnerOptimizer:
    """Adadelta (Zeiler 2012); eps is inside both roots, as in torch."""

    def update(grads, state, params, *, lr=lr):
        sq = {k: rho * state.square_avg[k] + (1 - rho) * g * g for k, g in grads.items()}
        delta = {
            k: torch.sqrt(state.acc_delta[k] + eps) / torch.sqrt(sq[k] + eps) * g
            for k, g in grads.items()
        }
        acc = {k: rho * state.acc_delta[k] + (1 - rho) * d * d for k, d in delta.items()}
        return (
            {k: p - lr * delta[k] for k, p in params.items()},
            AdadeltaState(state.step + 1, sq, acc),
        )

    return _make(
        "adadelta",
        lambda p: AdadeltaState(0, _zeros(p), _zeros(p)),
        update,
        torch.optim.Adadelta,
        lr=lr,
        rho=rho,
        eps=eps,
    )


def adam(
    *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015), with bias correction as torch.optim.Adam."""
    b1, b2 = float(betas[0]), float(betas[1])

    def update(grads, state, params, *, lr=lr):
        grads = _decay(grads, params, weight_decay)
        step = state.step + 1
        m = {k: b1 * state.m[k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state.v[k] + (1 - b2) * g * g for k, g in grads.items()}
        bc1, bc2_sqrt = 1 - b1**step, (1 - b2**step) ** 0.5
        new = {k: p - (lr / bc1) * m[k] / (_sqrt(v[k]) / bc2_sqrt + eps) for k, p in params.items()}
        return new, AdamState(step, m, v)

    return _make(
        "adam",
        lambda p: AdamState(0, _zeros(p), _zeros(p)),
        update,
        torch.optim.Adam,
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay,
    )


def nadam(
    *, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8, momentum_decay: float = 4e-3
) -> InnerOptimizer:
    """NAdam (Dozat 2016) with torch.optim.NAdam's momentum-decay schedule."""
    b1, b2 = float(betas[0]), float(betas[1])

    def update(grads, state, params, *, lr=lr):
        step = state.step + 1
        mu = b1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
        mu_product = state.mu_product * mu
        m = {k: b1 * state.m[k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state.v[k] + (1 - b2) * g * g for k, g in grads.items()}
        bc2 = 1 - b2**step
        new = {}
        for k, p in params.items():
            denom = _sqrt(v[k] / bc2) + eps
            new[k] = (
                p
                - lr * (1 - mu) / (1 - mu_product) * grads[k] / denom
                - lr * mu_next / (1 - mu_product * mu_next) * m[k] / denom
            )
        return new, NAdamState(step, m, v, mu_product)

    return _make(
        "nadam",
        lambda p: NAdamState(0, _zeros(p), _zeros(p), 1.0),
        update,
        torch.optim.NAdam,
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        momentum_decay=momentum_decay,
    )

"""The outer loop: update the loss's φ with hypergradients of a validation objective.

Two modes, both generators yielding ``(step, metrics)`` so the caller decides what to log,
plot and checkpoint (no I/O in here):

* :func:`offline_steps` — ML3 / EvoMAL style: each outer step starts T inner loops from
  fresh initialisations θ0 (Bechtle et al. 2021; Raymond et al. 2023).
* :func:`online_steps` — AdaLFL style (Raymond, Chen, Xue, Zhang, "Online Loss Function
  Learning", 2023): one real training run; every ``update_every`` base steps φ is updated
  by unrolling K look-ahead steps from the *current* θ, then θ takes its real step with
  the updated loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from metaloss.hypergrad.base import (
    LOSS_PREFIX,
    LR_KEY,
    MetaBatch,
    MetaProblem,
    detach,
    grad_theta,
    meta_params,
)
from metaloss.sampling import stacked_init
from metaloss.tasks.base import Task
from metaloss.train import batches

log = logging.getLogger("metaloss")


class NonFiniteMetaGradient(FloatingPointError):
    """Too many consecutive outer steps produced NaN/inf meta-losses or hypergradients."""


class MetaLearner:
    """φ (the loss's parameters), an optional learned inner log-lr, and the meta-optimizer.

    ``step(problem, hypergrad, batch)`` computes the hypergradient, skips the update (and
    says so) when it is not finite, clips it and applies it. φ is only ever changed by the
    optimizer, never in place on the meta-graph.
    """

    def __init__(self, loss: nn.Module, make_optimizer: Callable, *, learn_inner_lr: bool = False,
                 inner_lr: float = 0.01, clip_grad_norm: float | None = None,
                 max_bad_steps: int = 20) -> None:
        self.loss = loss
        self.log_lr = nn.Parameter(torch.tensor(math.log(inner_lr))) if learn_inner_lr else None
        self.params = dict(meta_params(loss, self.log_lr))
        self.optimizer = make_optimizer(list(self.params.values()))
        self.clip = clip_grad_norm
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.skipped = 0

    def step(self, problem: MetaProblem, hypergrad: Callable, batch: MetaBatch) -> dict[str, float]:
        hg = hypergrad(problem, self.params, batch)
        finite = bool(torch.isfinite(hg.loss)) and all(bool(torch.isfinite(g).all()) for g in hg.grads.values())
        if not finite:
            self.bad_steps += 1
            self.skipped += 1
            log.warning("non-finite meta-loss/hypergradient (meta-loss %s): update skipped (%d in a row)",
                        float(hg.loss), self.bad_steps)
            if self.bad_steps >= self.max_bad_steps:
                raise NonFiniteMetaGradient(
                    f"{self.bad_steps} consecutive outer steps gave NaN/inf; the learned loss has left "
                    "its stable range: lower meta_optim.lr, set meta.clip_grad_norm, or shorten meta.inner_steps")
            return {"meta/val_objective": float("nan"), "meta/skipped": float(self.skipped)}
        self.bad_steps = 0
        for k, p in self.params.items():
            p.grad = hg.grads[k].to(p.dtype)
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"meta/val_objective": float(hg.loss), "meta/grad_norm": float(norm),
               "meta/skipped": float(self.skipped)}
        if self.log_lr is not None:
            out["meta/inner_lr"] = float(self.log_lr.detach().exp())
        return out

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict(),
                "log_lr": None if self.log_lr is None else self.log_lr.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        if self.log_lr is not None and state.get("log_lr") is not None:
            with torch.no_grad():
                self.log_lr.copy_(state["log_lr"])
        self.optimizer.load_state_dict(state["optimizer"])


def offline_steps(learner: MetaLearner, problem: MetaProblem, hypergrad: Callable,
                  sample: Callable[[], MetaBatch], *, steps: int, start: int = 0
                  ) -> Iterator[tuple[int, dict[str, float]]]:
    """``steps`` outer updates, each on a fresh meta-batch from ``sample()``."""
    for step in range(start, steps):
        yield step + 1, learner.step(problem, hypergrad, sample())


def online_steps(learner: MetaLearner, problem: MetaProblem, hypergrad: Callable, task: Task,
                 factory: Callable, *, steps: int, update_every: int, batch_size: int | None,
                 val_batch: int | None, gen: torch.Generator, start: int = 0
                 ) -> Iterator[tuple[int, dict[str, float]]]:
    """One real training run of ``steps`` base steps with the loss updated along the way."""
    theta = {k: v[0] for k, v in stacked_init(factory, task, [int(torch.randint(2**31 - 1, (), generator=gen))]).items()}
    opt = problem.inner_opt
    state = opt.init(theta)
    it = batches(len(task.x_train), batch_size, gen)
    k_look = problem.inner_steps
    metrics: dict[str, float] = {}
    for step in range(start, steps):
        if step % update_every == 0:
            look = [next(it) for _ in range(k_look)]
            vidx = (torch.randint(len(task.x_val), (val_batch,), generator=gen)
                    if val_batch and val_batch < len(task.x_val) else torch.arange(len(task.x_val)))
            batch = MetaBatch({k: v[None] for k, v in theta.items()},
                              torch.stack([task.x_train[i] for i in look])[None],
                              torch.stack([task.y_train[i] for i in look])[None],
                              task.x_val[vidx][None], task.y_val[vidx][None])
            metrics = learner.step(problem, hypergrad, batch)
        idx = next(it)
        phi = {k[len(LOSS_PREFIX):]: v.detach() for k, v in learner.params.items() if k.startswith(LOSS_PREFIX)}
        g = grad_theta(problem, theta, phi, task.x_train[idx], task.y_train[idx], step / steps)
        kw = {} if LR_KEY not in learner.params else {"lr": learner.params[LR_KEY].detach().exp()}
        theta, state = opt.update(detach(g), state, theta, **kw)
        yield step + 1, metrics

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

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaloss.hypergrad.base import (
    LOSS_PREFIX,
    LR_KEY,
    MetaBatch,
    MetaProblem,
    Params,
    batched_objective,
    detach,
    grad_theta,
    meta_params,
)
from metaloss.sampling import stacked_init
from metaloss.tasks.base import Task
from metaloss.train import BatchSampler

log = logging.getLogger("metaloss")


class NonFiniteMetaGradient(FloatingPointError):
    """Too many consecutive outer steps produced NaN/inf meta-losses or hypergradients.
    ``cause`` is ``"inner"`` (the inner training diverges even with the initial φ) or
    ``"meta"`` (the meta-updates moved φ into an unstable region)."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class MetaLearner:
    """φ (the loss's parameters), an optional learned inner log-lr, and the meta-optimizer.

    ``step(problem, hypergrad, batch)`` computes the hypergradient, skips the update (and
    says so) when it is not finite, clips it and applies it. φ is only ever changed by the
    optimizer, never in place on the meta-graph. After ``max_bad_steps`` non-finite steps
    in a row it stops with :class:`NonFiniteMetaGradient`, naming the likely cause.
    """

    def __init__(self, loss: nn.Module, make_optimizer: Callable, *, learn_inner_lr: bool = False,
                 inner_lr: float = 0.01, clip_grad_norm: float | None = None,
                 max_bad_steps: int = 20) -> None:
        self.loss = loss
        ref = next(loss.parameters(), None)  # φ's device and dtype
        self.log_lr = (nn.Parameter(torch.tensor(math.log(inner_lr), device=None if ref is None else ref.device,
                                                 dtype=None if ref is None else ref.dtype))
                       if learn_inner_lr else None)
        self.params = dict(meta_params(loss, self.log_lr))
        self.optimizer = make_optimizer(list(self.params.values()))
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            # a negative max-norm would flip the gradient: silent gradient *ascent*
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.initial = {k: v.detach().clone() for k, v in self.params.items()}
        self.updates = 0
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
                cause, advice = self.diagnose(problem, batch)
                raise NonFiniteMetaGradient(f"{self.bad_steps} consecutive outer steps gave NaN/inf "
                                            f"meta-losses or hypergradients. {advice}", cause)
            return {"meta/val_objective": float("nan"), "meta/skipped": float(self.skipped)}
        self.bad_steps = 0
        self.updates += 1
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

    def diagnose(self, problem: MetaProblem | None, batch: MetaBatch | None) -> tuple[str, str]:
        """Why the meta-loss is not finite: re-run this batch's inner loops with the *initial*
        φ. Finite there (after successful updates) means the meta-updates moved φ somewhere
        unstable (meta learning rate); not finite means the inner training itself diverges."""
        at_init = float("nan")
        if problem is not None and batch is not None:
            try:
                with torch.no_grad():
                    at_init = float(batched_objective(problem, self.initial, batch))
            except Exception as e:  # a diagnosis must never hide the original failure
                log.debug("diagnosis at the initial φ failed: %s", e)
        if self.updates > 0 and math.isfinite(at_init):
            return "meta", (
                f"With the initial φ this batch trains finitely (objective {at_init:.4g}), so the "
                f"{self.updates} meta-updates moved φ into an unstable region: likely cause the META "
                "learning rate. Lower meta_optim.lr (continue from the last good φ with "
                "meta.resume_from=<run dir> meta_optim.lr=<smaller>) or lower meta.clip_grad_norm.")
        return "inner", (
            "The inner training diverges even with "
            + ("the initial φ" if self.updates == 0 or not math.isfinite(at_init) else "this φ")
            + ": likely cause the INNER learning rate. Lower optim.lr or meta.inner_steps.")

    def apply_hyperparameters(self, make_optimizer: Callable) -> dict[str, tuple[Any, Any]]:
        """Set the optimizer's hyper-parameters (lr, betas, ...) to those ``make_optimizer``
        builds, keeping its state; returns ``{name: (old, new)}`` for the ones that changed.
        Used on resume: a changed meta learning rate is applied, never silently ignored."""
        fresh = make_optimizer([torch.zeros(1, requires_grad=True)]).defaults
        changed = {}
        for group in self.optimizer.param_groups:
            for k, v in fresh.items():
                if k in group and group[k] != v:
                    changed[k] = (group[k], v)
                    group[k] = v
        return changed

    def state_dict(self) -> dict:
        """A deep copy: later optimizer steps do not change a state taken earlier."""
        return copy.deepcopy({"loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "log_lr": None if self.log_lr is None else self.log_lr.detach().clone(),
                              "counters": {"bad_steps": self.bad_steps, "skipped": self.skipped,
                                           "updates": self.updates}})

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        if self.log_lr is not None and state.get("log_lr") is not None:
            with torch.no_grad():
                self.log_lr.copy_(state["log_lr"])
        self.optimizer.load_state_dict(state["optimizer"])
        counters = state.get("counters") or {}
        self.bad_steps = int(counters.get("bad_steps", 0))
        self.skipped = int(counters.get("skipped", 0))
        self.updates = int(counters.get("updates", 0))


def offline_steps(learner: MetaLearner, problem: MetaProblem, hypergrad: Callable,
                  sample: Callable[[], MetaBatch], *, steps: int, start: int = 0
                  ) -> Iterator[tuple[int, dict[str, float]]]:
    """``steps`` outer updates, each on a fresh meta-batch from ``sample()``."""
    for step in range(start, steps):
        yield step + 1, learner.step(problem, hypergrad, sample())


@dataclass
class OnlineState:
    """Everything an online run carries between base steps besides φ and the RNG: the base
    model θ, its optimizer state and the minibatch position (checkpointed for exact resume)."""

    theta: Params
    opt_state: Any
    sampler: BatchSampler

    @classmethod
    def fresh(cls, problem: MetaProblem, task: Task, factory: Callable, batch_size: int | None,
              gen: torch.Generator) -> OnlineState:
        seed = int(torch.randint(2**31 - 1, (), generator=gen))
        theta = {k: v[0] for k, v in stacked_init(factory, task, [seed]).items()}
        return cls(theta, problem.inner_opt.init(theta), BatchSampler(len(task.x_train), batch_size, gen))

    def state_dict(self) -> dict:
        opt = self.opt_state._asdict() if hasattr(self.opt_state, "_asdict") else self.opt_state
        return copy.deepcopy({"theta": detach(self.theta), "opt_state": opt,
                              "sampler": self.sampler.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        ref = next(iter(self.theta.values()))  # checkpoints load on the CPU: back to θ's device

        def to(v):
            if isinstance(v, torch.Tensor):
                return v.to(ref.device)
            return {k: to(x) for k, x in v.items()} if isinstance(v, dict) else v

        self.theta = to(dict(state["theta"]))
        kind = type(self.opt_state)
        opt = to(state["opt_state"])
        self.opt_state = kind(**opt) if hasattr(kind, "_fields") else opt
        self.sampler.load_state_dict(state["sampler"])


def online_steps(learner: MetaLearner, problem: MetaProblem, hypergrad: Callable, task: Task,
                 state: OnlineState, *, steps: int, update_every: int, val_batch: int | None,
                 gen: torch.Generator, start: int = 0) -> Iterator[tuple[int, dict[str, float]]]:
    """One real training run of ``steps`` base steps with the loss updated along the way.
    ``state`` is updated in place at every yield, so the caller can checkpoint it."""
    opt = problem.inner_opt
    it = state.sampler
    k_look = problem.inner_steps
    metrics: dict[str, float] = {}
    for step in range(start, steps):
        theta = state.theta
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
        state.theta, state.opt_state = opt.update(detach(g), state.opt_state, theta, **kw)
        yield step + 1, metrics

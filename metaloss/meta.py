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
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metaloss.errors import ConfigError
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
    split_meta,
    unroll,
)
from metaloss.losses.base import loss_context
from metaloss.outer import OuterOptimizer
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
    An :class:`metaloss.outer.OuterOptimizer`.
    """

    outer = "gradient"

    def __init__(
        self,
        loss: nn.Module,
        make_optimizer: Callable,
        *,
        learn_inner_lr: bool = False,
        inner_lr: float = 0.01,
        clip_grad_norm: float | None = None,
        max_bad_steps: int = 20,
    ) -> None:
        self.loss = loss
        ref = next(loss.parameters(), None)  # φ's device and dtype
        self.log_lr = (
            nn.Parameter(
                torch.tensor(
                    math.log(inner_lr),
                    device=None if ref is None else ref.device,
                    dtype=None if ref is None else ref.dtype,
                )
            )
            if learn_inner_lr
            else None
        )
        self.params = dict(meta_params(loss, self.log_lr))
        check_finite_phi(self.params)
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
        self._last_bad: tuple[Any, Any, Any] | None = (
            None  # (problem, hypergrad, batch) of the last skipped step
        )

    def step(self, problem: MetaProblem, hypergrad: Callable, batch: MetaBatch) -> dict[str, float]:
        hg = hypergrad(problem, self.params, batch)
        finite = bool(torch.isfinite(hg.loss)) and all(
            bool(torch.isfinite(g).all()) for g in hg.grads.values()
        )
        if not finite:
            self.bad_steps += 1
            self.skipped += 1
            self._last_bad = (problem, hypergrad, batch)
            note = method_diagnosis(hypergrad)
            log.warning(
                "non-finite meta-loss/hypergradient (meta-loss %s): update skipped (%d in a row)%s",
                float(hg.loss),
                self.bad_steps,
                f" ({note[1]})" if note else "",
            )
            if self.bad_steps >= self.max_bad_steps:
                cause, advice = self.diagnose(problem, batch, hypergrad)
                raise NonFiniteMetaGradient(
                    f"{self.bad_steps} consecutive outer steps gave NaN/inf "
                    f"meta-losses or hypergradients. {advice}",
                    cause,
                )
            return {"meta/val_objective": float("nan"), "meta/skipped": float(self.skipped)}
        self.bad_steps = 0
        self.updates += 1
        for k, p in self.params.items():
            p.grad = hg.grads[k].to(p.dtype)
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {
            "meta/val_objective": float(hg.loss),
            "meta/grad_norm": float(norm),
            "meta/skipped": float(self.skipped),
        }
        if self.log_lr is not None:
            out["meta/inner_lr"] = float(self.log_lr.detach().exp())
        return out

    def diagnose(
        self,
        problem: MetaProblem | None,
        batch: MetaBatch | None,
        hypergrad: Callable | None = None,
    ) -> tuple[str, str]:
        """Why the meta-loss is not finite. If the hypergradient method names its own failure
        (a diverging Neumann series, every ES candidate diverged) and the inner training with
        the current φ is finite on this batch, that method's setting is to blame. Otherwise
        re-run this batch's inner loops with the *initial* φ: finite there (after successful
        updates) means the meta-updates moved φ somewhere unstable (meta learning rate); not
        finite means the inner training itself diverges (inner learning rate)."""
        at_init = objective_or_nan(problem, self.initial, batch)
        note = method_diagnosis(hypergrad)
        if note is not None:
            at_now = (
                at_init
                if self.updates == 0
                else objective_or_nan(problem, detach(self.params), batch)
            )
            if math.isfinite(at_now):
                return note[0], (
                    f"The inner training with the current φ is finite on this batch (objective "
                    f"{at_now:.4g}), so the hypergradient method failed: {note[1]}. {note[2]}"
                )
        if self.updates > 0 and math.isfinite(at_init):
            return "meta", (
                f"With the initial φ this batch trains finitely (objective {at_init:.4g}), so the "
                f"{self.updates} meta-updates moved φ into an unstable region: likely cause the "
                "META "
                "learning rate. Lower meta_optim.lr (continue from the last good φ with "
                "meta.resume_from=<run dir> meta_optim.lr=<smaller>) or lower meta.clip_grad_norm."
            )
        return "inner", (
            "The inner training diverges even with "
            + ("the initial φ" if self.updates == 0 or not math.isfinite(at_init) else "this φ")
            + ": likely cause the INNER learning rate. Lower optim.lr or meta.inner_steps."
        )

    def finish(self) -> str | None:
        """Called after the last outer step: refuse a run in which no step produced a finite
        hypergradient (φ was never meta-trained, so there is no result to call complete),
        with the same diagnosis as a NaN streak; warn when the run *ended* on skipped steps
        (φ is then the last good step's). Returns that warning, or None."""
        return finish_run(self)

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
        return copy.deepcopy(
            {
                "loss": self.loss.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "log_lr": None if self.log_lr is None else self.log_lr.detach().clone(),
                "counters": {
                    "bad_steps": self.bad_steps,
                    "skipped": self.skipped,
                    "updates": self.updates,
                },
            }
        )

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


def check_finite_phi(params: Params) -> None:
    """Refuse a starting φ (or inner log-lr) holding NaN/inf: every step would be skipped and
    the divergence diagnosis would wrongly blame a learning rate."""
    bad = [k for k, v in params.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        raise ConfigError(
            f"the loss's initial meta-parameters {bad} hold NaN/inf values: nothing can be "
            "meta-trained from them (check the loss's initialisation or the file it was loaded "
            "from)"
        )


def method_diagnosis(hypergrad: Any) -> tuple[str, str, str] | None:
    """``(cause, finding, fix)`` from a hypergradient method that knows why its last estimate was
    not finite (``hypergrad.diagnosis()``, e.g. a diverging Neumann series), else None. The
    finding is logged with every skipped step; the fix only when the learner has checked that
    the inner training itself is finite (else the inner lr is to blame, whatever the method)."""
    hypergrad = getattr(hypergrad, "method", hypergrad)  # distributed.Sharded wraps the method
    fn = getattr(hypergrad, "diagnosis", None)
    try:
        return fn() if callable(fn) else None
    except Exception as e:  # a diagnosis must never hide the original failure
        log.debug("hypergradient diagnosis failed: %s", e)
        return None


def objective_or_nan(problem: MetaProblem | None, meta: Params, batch: MetaBatch | None) -> float:
    """The objective of ``meta`` on ``batch`` (mean over its tasks), NaN when there is none or it
    cannot be computed: for the divergence diagnoses here and in :mod:`metaloss.cmaes`, which
    must never hide the failure they explain."""
    if problem is None or batch is None:
        return float("nan")
    try:
        with torch.no_grad():
            return float(batched_objective(problem, meta, batch))
    except Exception as e:  # a diagnosis must never hide the original failure
        log.debug("diagnosis objective failed: %s", e)
        return float("nan")


def finish_run(learner: Any) -> str | None:
    """The end-of-run rule shared by the gradient learner and CMA-ES: a run whose every outer
    step was skipped (NaN/inf hypergradient, or no finite CMA-ES candidate) produced no φ and
    stops with :class:`NonFiniteMetaGradient` (the app exits non-zero, keeps no
    ``learned_loss.pt``); a run that ended on a shorter streak of skipped steps keeps the last
    good φ and says so. ``learner`` needs ``bad_steps``, ``updates``, ``diagnose`` and
    ``_last_bad``."""
    if learner.bad_steps == 0:
        return None
    problem, hypergrad, batch = learner._last_bad or (None, None, None)
    if learner.updates == 0:
        cause, advice = learner.diagnose(problem, batch, hypergrad)
        raise NonFiniteMetaGradient(
            f"every one of the {learner.bad_steps} outer steps gave NaN/inf meta-losses or "
            "hypergradients "
            f"(meta.max_bad_steps = {learner.max_bad_steps} was not reached, but no step produced "
            f"a φ). {advice}",
            cause,
        )
    msg = (
        f"meta-training ended on {learner.bad_steps} skipped outer step(s) in a row (NaN/inf); the "
        "learned "
        f"loss is the last good step's φ ({learner.updates} good steps in all)"
    )
    log.warning(msg)
    return msg


STALL_TOLERANCE = 0.01  # relative change of the objective over the run below which it "never moved"
STALL_MIN_STEPS = 5  # finite objective values needed before a run can be called stalled
FLAT_LOSS = 0.05  # |∂ℓ/∂ŷ| below this fraction of the objective's counts as a flat loss


def stalled(
    values: Sequence[float], tol: float = STALL_TOLERANCE, min_steps: int = STALL_MIN_STEPS
) -> tuple[float, float, int] | None:
    """``(start, end, n)`` when the run's ``n`` finite logged objectives did not move: the mean
    of the last third is within ``tol`` (relative) of the mean of the first third (thirds, so
    the per-step noise of fresh tasks and initialisations averages out); else None. A run
    whose objective got worse moved too (that is the divergence diagnosis's business), and an
    objective at 0 has nothing to improve."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if len(finite) < min_steps:
        return None
    w = max(1, len(finite) // 3)
    start, end = sum(finite[:w]) / w, sum(finite[-w:]) / w
    if abs(start) < 1e-8 or abs(end - start) > tol * abs(start):
        return None
    return start, end, len(finite)


def _norm(tree: Params) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in tree.values()))


class _ObjectiveAsLoss(nn.Module):
    """The validation objective used as the inner loss: the reference for "could K inner steps
    at this learning rate move the objective at all?"."""

    def __init__(self, objective: Callable, context: dict) -> None:
        super().__init__()
        self.objective, self.context = objective, context

    def forward(self, pred, target, **_):
        return self.objective(pred, target, **self.context)


def explain_stall(
    problem: MetaProblem,
    meta: Params,
    batch: MetaBatch,
    *,
    num_classes: int | None = None,
    outer: str = "gradient",
) -> str:
    """Why the objective does not move, measured on one task of ``batch``: does K steps of inner
    training with the learned φ change the validation objective at all (vs. the untrained
    model), would K steps with the *objective itself* as the inner loss (same optimizer and
    lr), how far θ moves, and how large the learned loss's gradient w.r.t. the predictions is
    next to the objective's. Names the settings to change."""
    phi, lr = split_meta(detach(meta))
    theta0 = {k: v[0] for k, v in batch.theta0.items()}
    xt, yt, xv, yv = batch.x_train[0], batch.y_train[0], batch.x_val[0], batch.y_val[0]
    ctx = problem.objective_context

    def objective(theta: Params, x, y) -> float:
        return float(
            problem.objective(functional_call(problem.model, theta, (x,)), y, **ctx).mean()
        )

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    with torch.no_grad():
        theta = unroll(problem, detach(meta), theta0, xt, yt)
        untrained, trained = objective(theta0, xv, yv), objective(theta, xv, yv)
        moved = _norm({k: theta[k] - theta0[k] for k in theta}) / max(_norm(theta0), 1e-30)
        ref_problem = dataclasses.replace(problem, loss=_ObjectiveAsLoss(problem.objective, ctx))
        ref = objective(
            unroll(ref_problem, {} if lr is None else {LR_KEY: lr}, theta0, xt, yt), xv, yv
        )
    pred = functional_call(problem.model, theta0, (xt[0],)).detach().requires_grad_(True)
    g_loss = torch.autograd.grad(
        functional_call(
            problem.loss, phi, (pred, yt[0]), loss_context(problem.class_counts, xt[0], 0.0)
        ).mean(),
        pred,
    )[0]
    g_obj = torch.autograd.grad(problem.objective(pred, yt[0], **ctx).mean(), pred)[0]
    ratio = float(g_loss.norm()) / max(float(g_obj.norm()), 1e-30)
    k, inner_lr = (
        problem.inner_steps,
        (float(lr.exp()) if lr is not None else problem.inner_opt.hparams.get("lr")),
    )
    budget = f"optim.lr (now {inner_lr:g}) or meta.inner_steps (now {k})"
    chance = (
        f"; chance level for {num_classes} classes is ln {num_classes} = "
        f"{math.log(num_classes):.4f}"
        if num_classes and abs(untrained - math.log(num_classes)) < 0.02 * math.log(num_classes)
        else ""
    )
    if rel(trained, untrained) > STALL_TOLERANCE:
        step = "meta_optim.sigma0" if outer == "cmaes" else "meta_optim.lr"
        return (
            f"The inner training does change the objective ({untrained:.4g} untrained -> "
            f"{trained:.4g} after K={k} "
            f"steps) but the meta-updates do not move it: raise {step} or meta.steps."
        )
    out = (
        f"Likely cause: the inner models do not learn. After K={k} inner steps the validation "
        "objective is "
        f"{trained:.4g}, the same as the untrained models' ({untrained:.4g}{chance}); θ moved "
        f"{100 * moved:.3g}% of its norm."
    )
    flat = ratio < FLAT_LOSS
    fit = (
        "loss.fit_to=ce (or mse)"
        if "fit_to" in getattr(problem.loss, "init_kwargs", {})
        else "a known loss"
    )
    if rel(ref, untrained) <= STALL_TOLERANCE:
        out += (
            " The inner budget is too small for ANY loss: even the objective itself as the inner "
            "loss gives "
            f"{ref:.4g} after the same K={k} steps (φ would have to find far larger gradients on "
            "its own); "
            f"raise {budget}."
        )
        if flat:
            out += (
                " The learned loss is also nearly flat in the predictions (its gradient w.r.t. "
                "them is "
                f"{100 * ratio:.3g}% of the objective's): start φ from {fit} too."
            )
        return out
    if flat:
        return out + (
            f" The learned loss is nearly flat in the predictions: its gradient w.r.t. them is "
            f"{100 * ratio:.3g}% of the objective's (K steps with the objective itself as the loss "
            "reach "
            f"{ref:.4g}), so the hypergradient is tiny too. Start φ from {fit}, or raise {budget}."
        )
    return out + (
        f" With the objective itself as the inner loss the same K steps reach {ref:.4g}: the "
        "learned loss "
        f"(gradient {100 * ratio:.3g}% of the objective's) does not train the models. Start φ from "
        f"{fit}, "
        f"or raise {budget}."
    )


def check_progress(
    objectives: Sequence[float],
    problem: MetaProblem,
    meta: Params,
    sample: Callable[[], MetaBatch],
    *,
    num_classes: int | None = None,
    outer: str = "gradient",
    initial: Params | None = None,
) -> str | None:
    """At the end of meta-training: a warning (logged and returned) when the logged
    ``meta/val_objective`` never moved, or φ is exactly its start (``initial``: every
    hypergradient was zero — on a task family the objective's step-to-step noise can hide
    that), naming the likely cause; None otherwise. ``sample`` draws a batch for the
    explanation (only called when the run stalled)."""
    found = stalled(objectives)
    unchanged = (
        initial is not None
        and any(math.isfinite(v) for v in objectives)
        and all(torch.equal(initial[k], meta[k].detach().to(initial[k].device)) for k in initial)
    )
    if found is None and not unchanged:
        return None
    if found is not None:
        start, end, n = found
        w = max(1, n // 3)
        msg = (
            f"meta-training did not move the objective: meta/val_objective averaged {start:.5g} "
            "over the first "
            f"{w} and {end:.5g} over the last {w} of {n} outer steps (a "
            f"{100 * abs(end - start) / abs(start):.2g}% "
            f"change, under {100 * STALL_TOLERANCE:g}%), so φ is no better than its start"
            + (" (it did not change at all: every hypergradient was zero)." if unchanged else ".")
        )
    else:
        msg = (
            f"meta-training did not change φ: after {len(objectives)} outer steps every "
            "meta-parameter equals its "
            "start (every hypergradient was zero), so the learned loss is the initial one."
        )
    try:
        msg += " " + explain_stall(problem, meta, sample(), num_classes=num_classes, outer=outer)
    except Exception as e:  # the warning must not fail a finished run
        log.debug("explaining the stalled objective failed: %s", e)
    log.warning(msg)
    return msg


def offline_steps(
    learner: OuterOptimizer,
    problem: MetaProblem,
    hypergrad: Callable,
    sample: Callable[[], MetaBatch],
    *,
    steps: int,
    start: int = 0,
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
    def fresh(
        cls,
        problem: MetaProblem,
        task: Task,
        factory: Callable,
        batch_size: int | None,
        gen: torch.Generator,
    ) -> OnlineState:
        seed = int(torch.randint(2**31 - 1, (), generator=gen))
        theta = {k: v[0] for k, v in stacked_init(factory, task, [seed]).items()}
        return cls(
            theta, problem.inner_opt.init(theta), BatchSampler(len(task.x_train), batch_size, gen)
        )

    def state_dict(self) -> dict:
        opt = self.opt_state._asdict() if hasattr(self.opt_state, "_asdict") else self.opt_state
        return copy.deepcopy(
            {"theta": detach(self.theta), "opt_state": opt, "sampler": self.sampler.state_dict()}
        )

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


def online_steps(
    learner: OuterOptimizer,
    problem: MetaProblem,
    hypergrad: Callable,
    task: Task,
    state: OnlineState,
    *,
    steps: int,
    update_every: int,
    val_batch: int | None,
    gen: torch.Generator,
    start: int = 0,
) -> Iterator[tuple[int, dict[str, float]]]:
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
            vidx = (
                torch.randint(len(task.x_val), (val_batch,), generator=gen)
                if val_batch and val_batch < len(task.x_val)
                else torch.arange(len(task.x_val))
            )
            batch = MetaBatch(
                {k: v[None] for k, v in theta.items()},
                torch.stack([task.x_train[i] for i in look])[None],
                torch.stack([task.y_train[i] for i in look])[None],
                task.x_val[vidx][None],
                task.y_val[vidx][None],
            )
            metrics = learner.step(problem, hypergrad, batch)
        idx = next(it)
        phi = {
            k[len(LOSS_PREFIX) :]: v.detach()
            for k, v in learner.params.items()
            if k.startswith(LOSS_PREFIX)
        }
        g = grad_theta(problem, theta, phi, task.x_train[idx], task.y_train[idx], step / steps)
        kw = {} if LR_KEY not in learner.params else {"lr": learner.params[LR_KEY].detach().exp()}
        state.theta, state.opt_state = opt.update(detach(g), state.opt_state, theta, **kw)
        yield step + 1, metrics

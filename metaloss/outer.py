"""Outer optimizers: how φ is searched, behind one small protocol.

Two ship with metaloss: the gradient learner (:class:`metaloss.meta.MetaLearner`: a torch
optimizer on a hypergradient from ``hypergrad=``) and CMA-ES (:class:`metaloss.cmaes.CMAES`:
derivative-free, on candidates' validation metrics). The outer loop
(:func:`metaloss.meta.offline_steps` / :func:`~metaloss.meta.online_steps`), the checkpoint
(:mod:`metaloss.checkpoint`) and ``metaloss-meta`` see only :class:`OuterOptimizer`; a new
search (a GP, a symbolic search) implements it and is chosen by ``meta_optim=`` with no change
to the engine (docs/extending.md, "Adding an outer optimizer").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class OuterOptimizer(Protocol):
    """What the outer loop, the checkpoint and the app need of a search over φ."""

    #: a short name for logs and diagnoses: "gradient", "cmaes", ...
    outer: str
    #: φ as the hypergradient methods see it: ``{"loss.<name>": tensor, ...}``; the search
    #: writes the loss module's parameters (these tensors), never replaces them
    params: dict[str, Tensor]
    #: outer steps that produced no update so far (non-finite objective or hypergradient)
    skipped: int

    def step(self, problem: Any, hypergrad: Any, batch: Any) -> dict[str, float]:
        """One outer step on a meta-batch; the metrics to log, with ``meta/val_objective``."""
        ...

    def finish(self) -> str | None:
        """After the last step: raise if no step ever produced φ, else a warning or None."""
        ...

    def apply_hyperparameters(self, make: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
        """On resume, the (possibly changed) ``meta_optim`` settings: ``{name: (old, new)}``."""
        ...

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (a deep copy)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


def build_outer(
    make: Any, loss: Any, cfg: Any, task_kind: str, world_size: int, gradient: Callable[[], Any]
) -> OuterOptimizer:
    """The outer optimizer ``meta_optim`` names. ``make`` is its instantiated config (a
    ``functools.partial``): a class with a ``for_run(make, loss, cfg, task_kind, world_size)``
    classmethod builds itself from the run's config (and refuses what makes no sense there);
    anything else is a torch optimizer, driven by the gradient learner ``gradient()`` builds."""
    target = getattr(make, "func", make)
    for_run = getattr(target, "for_run", None)
    learner = for_run(make, loss, cfg, task_kind, world_size) if callable(for_run) else gradient()
    if not isinstance(learner, OuterOptimizer):
        raise TypeError(
            f"meta_optim: {type(learner).__name__} is not an outer optimizer (it needs outer, "
            "params, skipped, step, finish, apply_hyperparameters, state_dict, load_state_dict: "
            "metaloss.outer.OuterOptimizer)"
        )
    return learner

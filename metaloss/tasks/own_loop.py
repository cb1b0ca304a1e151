"""The base of tasks that train with a loop of their own (:attr:`metaloss.kinds.TaskKind.
own_loop`: GANs, :mod:`metaloss.gan.task`; policy gradients, :mod:`metaloss.rl.task`), which
``metaloss-train`` and ``metaloss-meta`` run through :mod:`metaloss.cli.own_loop`.

Such a task holds a training budget and knows how to train with a loss (``train``: test
measures and their validation twins, ``{"test/<m>": ..., "val/<m>": ...}``) and how to search
a learned loss with CMA-ES (``search``); ``debug_sized`` is the same task in seconds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar


class OwnLoopTask:
    """Subclasses set ``kind``, ``name``, ``primary_metric``, ``budget`` and ``search_fn`` (a
    family's ``search(loss, budget, *, lr, generations, seeds, sigma0, popsize, seed,
    progress)`` returning an object with ``history``), and implement ``train``,
    ``debug_sized`` and ``describe``."""

    kind: ClassVar[str]
    name: str
    primary_metric: ClassVar[str]
    search_fn: ClassVar[Callable[..., Any]]
    budget: Any

    def train(self, loss: Any, *, lr: float, seed: int) -> dict[str, float]:
        raise NotImplementedError

    def debug_sized(self, **keep: Any) -> OwnLoopTask:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def search(
        self,
        loss: Any,
        *,
        lr: float,
        generations: int,
        seeds: int,
        sigma0: float,
        popsize: int | None,
        seed: int,
        progress: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """CMA-ES over ``loss``'s parameters (left at CMA's final mean): one row per
        generation."""
        return (
            type(self)
            .search_fn(
                loss,
                self.budget,
                lr=lr,
                generations=generations,
                seeds=seeds,
                sigma0=sigma0,
                popsize=popsize,
                seed=seed,
                progress=progress,
            )
            .history
        )

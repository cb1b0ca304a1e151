"""Choosing the learned loss on data no fitness evaluation saw (``meta.selection``).

A search scores φ on validation batches; after many outer steps the last φ fits those
batches, not only the task. With ``meta.selection.frac > 0`` a fixed part of each task's
validation split is held out as a *selection split*: the outer objective never reads it. The
search keeps φ every ``meta.selection.every`` outer steps; at the end each kept φ trains
``meta.selection.seeds`` models from the same fresh initialisations and inner batches (common
random numbers) and is scored on the whole selection split by the search's own objective. The
best becomes the learned loss. The start φ₀ (step 0) is a candidate too, so a warm start
(metaloss.residual) can end exactly where it began if nothing the search found holds up; with
``meta.selection.margin`` > 0 it is left only for a φ better by more than the margin.
``selection.json`` records, for every kept φ, its selection score beside the search's logged
validation objective of that step (``logged_objective``: for a gradient learner the value
before that step's update, for CMA-ES the population's mean — a trace of the search, not the
kept φ's own fitness). The test split is not read.
(Held-out selection of the final candidate is the remedy for fitness overfitting that the
evolutionary-loss literature recommends: Gonzalez & Miikkulainen 2021, TaylorGLO; Raymond et
al. 2023, EvoMAL, select their final loss on separate validation data.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from metaloss.hypergrad.base import MetaProblem, batched_objective
from metaloss.sampling import sample_meta_batch
from metaloss.tasks.base import Task

SELECTION_SEED = 31_337  # which validation rows are held out, and the selection's inits


def split_validation(task: Task, frac: float) -> tuple[Task, Task]:
    """``task`` twice: with the validation rows the search may read, and with the held-out
    selection rows as its validation split: a fixed random ``frac`` of them (at least one),
    stratified by class for kinds whose targets are classes, so a rare class is held out in
    proportion rather than by chance."""
    n = len(task.x_val)
    if n < 2:
        raise ValueError(
            f"meta.selection.frac = {frac}: task {task.name} has {n} validation example(s), "
            "too few to hold any out"
        )
    gen = torch.Generator().manual_seed(SELECTION_SEED)
    y = task.y_val.detach().cpu()
    strata = (
        [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
        if task.class_counts is not None
        else [torch.arange(n)]
    )
    held_rows = []
    for rows in strata:
        rows = rows[torch.randperm(len(rows), generator=gen)]
        held_rows.append(rows[: round(frac * len(rows))])
    held = torch.cat(held_rows)
    if len(held) == 0:  # every stratum rounded to none: hold out one row
        held = torch.randperm(n, generator=gen)[:1]
    if len(held) == n:  # every row held out: keep one for the search
        held = held[1:]
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    held, kept = held.sort().values, torch.nonzero(mask).flatten()
    held, kept = held.to(task.x_val.device), kept.to(task.x_val.device)
    fit = dataclasses.replace(task, x_val=task.x_val[kept], y_val=task.y_val[kept])
    select = dataclasses.replace(task, x_val=task.x_val[held], y_val=task.y_val[held])
    return fit, select


def score(
    problem: MetaProblem,
    snapshots: dict[int, dict[str, Tensor]],
    tasks: Sequence[Task],
    factory: Callable[..., Any],
    *,
    seeds: int,
    inner_steps: int,
    inner_batch: int | None,
) -> dict[int, float]:
    """Each kept φ's selection score: the mean objective of ``problem`` after ``inner_steps``
    from ``seeds`` fresh initialisations on the selection ``tasks`` (their whole validation
    split), every φ on the same draws. NaN for a φ that diverged."""
    batch = sample_meta_batch(
        list(tasks),
        factory,
        n_tasks=seeds,
        inner_steps=inner_steps,
        inner_batch=inner_batch,
        val_batch=None,
        gen=torch.Generator().manual_seed(SELECTION_SEED),
    )
    out = {}
    for step, phi in sorted(snapshots.items()):
        with torch.no_grad():
            value = float(batched_objective(problem, phi, batch))
        out[step] = value if math.isfinite(value) else math.nan
    return out


def choose(scores: dict[int, float], margin: float = 0.0) -> int | None:
    """The step whose φ scored lowest on the selection split (the latest of ties); None when
    every kept φ diverged. With ``margin`` > 0 the start φ₀ (step 0), when it is a candidate
    and finite, is left only for a φ that scores lower by more than ``margin``
    (``meta.selection.margin``, in the objective's units): a warm start moves on evidence
    larger than the selection split's own resolution, not on one or two of its rows."""
    finite = {s: v for s, v in scores.items() if math.isfinite(v)}
    if not finite:
        return None
    best = min(finite.values())
    step = max(s for s, v in finite.items() if v == best)
    if margin > 0 and 0 in finite and step != 0 and not best < finite[0] - margin:
        return 0
    return step

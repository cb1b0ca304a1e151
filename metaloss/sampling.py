"""Meta-batches: T (task, fresh θ0, inner batches, validation batch) stacked for ``vmap``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from metaloss.hypergrad.base import MetaBatch, Params
from metaloss.tasks.base import Task
from metaloss.train import build_model


def stacked_init(factory: Callable[..., nn.Module], task: Task, seeds: Sequence[int]) -> Params:
    """Fresh initialisations θ0 for each seed, stacked along a leading task axis."""
    inits = [
        dict(build_model(factory, task, int(s)).named_parameters()) for s in seeds
    ]  # on task's device
    return {k: torch.stack([p[k].detach() for p in inits]) for k in inits[0]}


def _rows(n: int, size: int | None, shape: tuple[int, ...], gen: torch.Generator) -> Tensor | None:
    """Random row indices of ``shape + (size,)``, or None for the whole split."""
    if not size or size >= n:
        return None
    return torch.randint(n, (*shape, size), generator=gen)


def sample_meta_batch(
    tasks: Sequence[Task],
    factory: Callable[..., nn.Module],
    *,
    n_tasks: int,
    inner_steps: int,
    inner_batch: int | None,
    val_batch: int | None,
    gen: torch.Generator,
    val_from_train: bool = False,
) -> MetaBatch:
    """Draw ``n_tasks`` members: a task from the pool, a fresh θ0, K inner minibatches
    from its training split (the whole split each step if ``inner_batch`` is None) and a
    validation batch from its validation split (whole split if ``val_batch`` is None).
    ``val_from_train`` reproduces ML3's protocol: the outer objective is computed on the
    last inner training batch instead of held-out data."""
    picks = torch.randint(len(tasks), (n_tasks,), generator=gen).tolist()
    seeds = torch.randint(2**31 - 1, (n_tasks,), generator=gen).tolist()
    theta0 = stacked_init(factory, tasks[0], seeds)
    xs, ys, xvs, yvs = [], [], [], []
    for i in picks:
        t = tasks[i]
        idx = _rows(len(t.x_train), inner_batch, (inner_steps,), gen)
        if idx is None:
            xs.append(t.x_train.expand(inner_steps, *t.x_train.shape))
            ys.append(t.y_train.expand(inner_steps, *t.y_train.shape))
        else:
            xs.append(t.x_train[idx])
            ys.append(t.y_train[idx])
        if val_from_train:
            xvs.append(xs[-1][-1])
            yvs.append(ys[-1][-1])
            continue
        vidx = _rows(len(t.x_val), val_batch, (), gen)
        xvs.append(t.x_val if vidx is None else t.x_val[vidx])
        yvs.append(t.y_val if vidx is None else t.y_val[vidx])
    return MetaBatch(theta0, torch.stack(xs), torch.stack(ys), torch.stack(xvs), torch.stack(yvs))

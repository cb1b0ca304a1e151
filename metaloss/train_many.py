"""Train many fresh models at once: one ``vmap`` over (seed, task) members.

The meta-test trains seeds × tasks models per loss; looping over them in Python leaves the
machine idle between tiny kernels. Here every member's step is one vectorised call of
``grad(mean loss)`` followed by the functional optimizer, which equals its ``torch.optim``
twin (tested), so the numbers are those of :func:`metaloss.train.train_model` run member by
member: the same initialisation (``build_model(factory, task, seed)``), the same minibatch
order (a CPU generator seeded by the member's seed), the same metrics, and a member whose
loss turns NaN/inf is reported as diverged (None), like ``NonFiniteLoss`` in the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch.func import functional_call, grad_and_value, vmap

from metaloss.inner.optimizers import InnerOptimizer
from metaloss.losses.base import loss_context
from metaloss.metrics import evaluate
from metaloss.sampling import stacked_init
from metaloss.tasks.base import Task
from metaloss.train import BatchSampler, build_model


class CannotStack(ValueError):
    """The members cannot be trained as one vmap (e.g. tasks of different sizes)."""


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    if all(t is first for t in tensors):
        return first.expand(len(tensors), *first.shape)  # one task for every member: no copy
    return torch.stack(tensors)


def train_many(
    tasks: Sequence[Task],
    seeds: Sequence[int],
    factory: Callable,
    loss: Callable,
    inner_opt: InnerOptimizer,
    *,
    steps: int,
    batch_size: int | None,
) -> list[dict[str, float] | None]:
    """Train member ``i`` on ``tasks[i]`` from the initialisation and batch order of
    ``seeds[i]``; return its final metrics (as ``train_model`` returns them), None if it
    diverged. Raises :class:`CannotStack` when the members' data cannot be stacked."""
    if len(tasks) != len(seeds) or not tasks:
        raise ValueError(f"need one seed per task, got {len(tasks)} tasks and {len(seeds)} seeds")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    first = tasks[0]
    for t in tasks:
        if (
            t.kind != first.kind
            or t.x_train.shape[1:] != first.x_train.shape[1:]
            or t.y_train.shape[1:] != first.y_train.shape[1:]
        ):
            raise CannotStack(
                f"tasks differ in kind or example shape ({t.name}: "
                f"{tuple(t.x_train.shape)} vs {tuple(first.x_train.shape)})"
            )
    # Minibatches have batch_size examples whatever a member's split size (BatchSampler never
    # yields a short batch), so training splits of different sizes (fresh draws of an imbalanced
    # subsample) stack; a full batch is the whole split, which must then be the same size.
    sizes = {len(t.x_train) for t in tasks}
    full = not batch_size or batch_size >= min(sizes)
    if full and len(sizes) > 1:
        raise CannotStack(
            f"full-batch training on training splits of different sizes {sorted(sizes)}"
        )
    n_members = len(tasks)
    template = build_model(factory, first, 0)
    theta = stacked_init(factory, first, seeds)
    counts = [t.class_counts for t in tasks]
    # the members share one kind (checked above), so either every count is None or none is
    counts_b = None if counts[0] is None else _stack(cast(list[torch.Tensor], counts))
    samplers = [
        BatchSampler(len(t.x_train), batch_size, torch.Generator().manual_seed(int(s)))
        for t, s in zip(tasks, seeds)
    ]
    if full:  # every step sees the whole split: gather it once
        x_full, y_full = _stack([t.x_train for t in tasks]), _stack([t.y_train for t in tasks])

    def member_loss(th, x, y, cnt, t):
        ctx = loss_context(cnt, x, t)
        return loss(functional_call(template, th, (x,)), y, **ctx).mean()

    step_fn = vmap(
        grad_and_value(member_loss), in_dims=(0, 0, 0, None if counts_b is None else 0, None)
    )
    state = inner_opt.init(theta)
    diverged = torch.zeros(n_members, dtype=torch.bool)
    running = None
    for step in range(steps):
        if full:
            x, y = x_full, y_full
        else:
            idx = [next(s) for s in samplers]
            x = torch.stack([t.x_train[i] for t, i in zip(tasks, idx)])
            y = torch.stack([t.y_train[i] for t, i in zip(tasks, idx)])
        grads, value = step_fn(theta, x, y, counts_b, step / max(1, steps))
        value = value.detach()
        diverged |= ~torch.isfinite(value).cpu()
        theta, state = inner_opt.update(grads, state, theta)
        v = value.double().cpu()
        running = v if running is None else 0.95 * running + 0.05 * v
    assert running is not None  # steps >= 1 (checked above)
    out: list[dict[str, float] | None] = []
    for b, task in enumerate(tasks):
        if diverged[b]:
            out.append(None)
            continue
        th = {k: v[b] for k, v in theta.items()}
        result = {"train/loss": float(running[b])}
        for split in ("val", "test"):
            xs, ys = task.split(split)
            with torch.no_grad():
                pred = torch.cat(
                    [
                        functional_call(template, th, (xs[i : i + 4096],))
                        for i in range(0, len(xs), 4096)
                    ]
                )
            result.update(
                evaluate(
                    task.kind,
                    pred,
                    ys,
                    num_classes=task.num_classes,
                    class_counts=task.class_counts,
                    prefix=split,
                )
            )
        out.append(result)
    return out

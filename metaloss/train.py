"""Plain training of one model with one loss: the baseline runner and the meta-test."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from metaloss.losses.base import loss_context
from metaloss.metrics import evaluate
from metaloss.runtime import canonical_draws
from metaloss.tasks.base import Task


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN/inf (typically a learned loss leaving its safe range)."""


def build_model(factory: Callable[..., nn.Module], task: Task, seed: int) -> nn.Module:
    """Instantiate a model for the task with a seeded initialisation, on the task's device
    and float dtype. The weights are drawn on the CPU, so they are the same on every device."""
    with torch.random.fork_rng(devices=[]), canonical_draws():
        torch.manual_seed(seed)
        model = factory(in_shape=task.in_shape, out_dim=task.out_dim)
    x = task.x_train
    return model.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def evaluate_model(model: nn.Module, task: Task, split: str) -> dict[str, float]:
    x, y = task.split(split)
    return evaluate(
        task.kind,
        predict(model, x),
        y,
        num_classes=task.num_classes,
        class_counts=task.class_counts,
        prefix=split,
    )


class BatchSampler:
    """Endless minibatch indices: a fresh permutation each epoch (full batch if None).

    Its position is state (``state_dict``/``load_state_dict``), so an interrupted run can
    continue with exactly the minibatches an uninterrupted one would have drawn.
    """

    def __init__(self, n: int, batch_size: int | None, generator: torch.Generator) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(
                f"batch_size must be an integer >= 1 or None (full batch), got {batch_size!r}"
            )
        if n < 1:
            raise ValueError(f"cannot draw minibatches from {n} examples")
        self.n, self.batch_size, self.gen = n, batch_size, generator
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.batch_size or self.batch_size >= self.n:
            return torch.arange(self.n)
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": None if self.perm is None else self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


def train_model(
    task: Task,
    model: nn.Module,
    loss_fn: Callable,
    make_optimizer: Callable,
    *,
    steps: int,
    batch_size: int | None,
    seed: int,
    eval_every: int = 0,
    log: Callable[[dict, int], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``model`` on the task's training split for ``steps`` optimizer steps.

    ``make_optimizer(params)`` builds a ``torch.optim`` optimizer. Every ``eval_every``
    steps validation metrics go to ``log(metrics, step)``. Returns the final train loss,
    validation and test metrics, namespaced (``train/loss``, ``val/acc``, ``test/acc``).
    Raises :class:`NonFiniteLoss` (with the step) if the loss is NaN or infinite.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model.parameters())
    x_all, y_all = task.x_train, task.y_train
    counts = task.class_counts  # computed once, not per step
    it = BatchSampler(len(x_all), batch_size, gen)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    running = None
    for step in bar:
        idx = next(it)
        x, y = x_all[idx], y_all[idx]
        loss = loss_fn(model(x), y, **loss_context(counts, x, step / max(1, steps))).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"training loss is {loss.item()} at step {step} of {desc!r}; "
                "lower the learning rate or check the loss"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if eval_every and (step + 1) % eval_every == 0:
            bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            if log is not None:
                log({"train/loss": running, **evaluate_model(model, task, "val")}, step + 1)
    result = {"train/loss": float(running if running is not None else float("nan"))}
    result.update(evaluate_model(model, task, "val"))
    result.update(evaluate_model(model, task, "test"))
    return result

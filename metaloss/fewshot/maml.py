"""MAML over episodes with a learned inner loss, vectorised over the meta-batch.

Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017: the model's initialisation θ0 is meta-learned so that a few gradient steps on an
episode's support set fit its query set. Here the inner steps minimise an inner loss
(:mod:`metaloss.fewshot.losses`) whose parameters φ are meta-learned with θ0 (MAML + a learned
loss; MeTAL). Meta-parameters are one flat dict: ``theta0/<name>`` and ``loss/<name>``.

The meta-batch's episodes run in one ``torch.vmap`` of the inner loop, differentiated by
``torch.func.grad_and_value``: second order by default (gradients through the inner gradients),
``first_order=True`` drops the terms through θ's own history (first-order MAML).
:func:`loop_objective` is the same computation one episode at a time with ``torch.autograd``
(the way MAML's and MeTAL's reference code runs): the reference in tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss.fewshot.losses import InnerLoss, Observation, task_loss
from metaloss.tasks.episodes import EpisodeBatch

Params = dict[str, Tensor]
THETA, LOSS = "theta0/", "loss/"
_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU)


@dataclass
class FewShotProblem:
    """What MAML needs besides the meta-parameters: the model (its structure; parameters come
    from the meta dict), the inner loss, the episodes' kind, and the inner loop's settings."""

    model: nn.Module
    loss: InnerLoss
    kind: str
    steps: int = 5
    inner_lr: float = 0.4
    first_order: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"maml.steps = {self.steps!r}: must be an integer >= 1")
        if not (isinstance(self.inner_lr, float | int) and 0 < self.inner_lr < math.inf):
            raise ValueError(f"maml.inner_lr = {self.inner_lr!r}: must be a number > 0")
        if self.kind != self.loss.kind:
            raise ValueError(
                f"the inner loss is for {self.loss.kind} episodes, the episodes are {self.kind}"
            )


def hidden_layers(model: nn.Module) -> int:
    """How many activation layers :func:`observe` reports means of."""
    return sum(isinstance(m, _ACTIVATIONS) for m in model.children())


def observe(model: nn.Module, params: Params, x: Tensor) -> Observation:
    """The model's outputs on ``x`` and the mean of each hidden activation layer's output
    (a sequential model: its children run one after the other)."""
    h, means = x, []
    for name, child in model.named_children():
        own = {k[len(name) + 1 :]: v for k, v in params.items() if k.startswith(name + ".")}
        h = functional_call(child, own, (h,))
        if isinstance(child, _ACTIVATIONS):
            means.append(h.mean())
    return Observation(h, torch.stack(means) if means else h.new_zeros(0))


def initial_meta(model: nn.Module, loss: InnerLoss) -> Params:
    """The meta-parameters at the start: the model's and the loss's parameters, detached."""
    meta = {THETA + n: p.detach().clone() for n, p in model.named_parameters()}
    meta.update({LOSS + n: p.detach().clone() for n, p in loss.named_parameters()})
    return meta


def split(meta: Params) -> tuple[Params, Params]:
    theta = {k[len(THETA) :]: v for k, v in meta.items() if k.startswith(THETA)}
    phi = {k[len(LOSS) :]: v for k, v in meta.items() if k.startswith(LOSS)}
    return theta, phi


def adapt(problem: FewShotProblem, meta: Params, xs: Tensor, ys: Tensor, xq: Tensor) -> Params:
    """θ after ``problem.steps`` SGD steps on the inner loss of one episode, from θ0."""
    theta, phi = split(meta)
    model, loss = problem.model, problem.loss

    def inner(params: Params, step: int) -> Tensor:
        support = observe(model, params, xs)
        query = observe(model, params, xq) if loss.uses_query else None
        return functional_call(loss, phi, (step, support, ys, query))

    grad = torch.func.grad(inner)
    for j in range(problem.steps):
        start = {k: v.detach() for k, v in theta.items()} if problem.first_order else theta
        g = grad(start, j)
        theta = {k: theta[k] - problem.inner_lr * g[k] for k in theta}
    return theta


def episode_scores(
    problem: FewShotProblem, meta: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
) -> tuple[Tensor, Tensor]:
    """(query loss, query accuracy — or query MSE for regression) after adapting."""
    theta = adapt(problem, meta, xs, ys, xq)
    out = functional_call(problem.model, theta, (xq,))
    value = task_loss(problem.kind, out, yq).mean()
    if problem.kind == "classification":
        return value, (out.argmax(-1) == yq).float().mean()
    return value, value.detach()


def batched_scores(problem: FewShotProblem, meta: Params, batch: EpisodeBatch):
    """Per-episode (query loss, accuracy) of the E episodes, one vmap."""

    def one(xs, ys, xq, yq):
        return episode_scores(problem, meta, xs, ys, xq, yq)

    return torch.vmap(one, randomness="error")(*batch)


def meta_gradient(
    problem: FewShotProblem, meta: Params, batch: EpisodeBatch
) -> tuple[Params, Tensor, Tensor]:
    """(gradient of the mean query loss w.r.t. the meta-parameters, mean query loss, mean
    accuracy) over the meta-batch: one vmap, differentiated by ``grad_and_value``."""

    def objective(m: Params):
        losses, accs = batched_scores(problem, m, batch)
        return losses.mean(), accs.mean()

    detached = {k: v.detach() for k, v in meta.items()}
    grads, (value, acc) = torch.func.grad_and_value(objective, has_aux=True)(detached)
    return grads, value.detach(), acc.detach()


def compiled_meta_gradient(problem: FewShotProblem):
    """:func:`meta_gradient` for this problem through ``torch.compile`` (``fewshot.compile``):
    one compilation (minutes on a CPU) for a meta-step several times faster at small models,
    where eager ``vmap`` is bound by per-operation overhead (scripts/bench_fewshot.py)."""

    def step(meta: Params, batch: EpisodeBatch):
        return meta_gradient(problem, meta, batch)

    return torch.compile(step)


def loop_objective(problem: FewShotProblem, meta: Params, batch: EpisodeBatch) -> Tensor:
    """The mean query loss one episode at a time with ``torch.autograd.grad(create_graph=True)``:
    the per-task loop of MAML's reference code, differentiable by ``.backward()`` in the
    meta-parameters (which must require grad). First-order: each inner gradient is taken at a
    detached θ (no terms through θ's history), and still depends on φ (a learned loss keeps its
    meta-gradient), as in :func:`adapt`."""
    theta0, phi = split(meta)
    model, loss = problem.model, problem.loss
    total = torch.zeros(())
    for xs, ys, xq, yq in zip(*batch):
        theta = dict(theta0)
        for j in range(problem.steps):
            at = theta
            if problem.first_order:  # cut θ's history; the gradient still depends on φ
                at = {n: v.detach().requires_grad_() for n, v in theta.items()}
            support = observe(model, at, xs)
            query = observe(model, at, xq) if loss.uses_query else None
            value = functional_call(loss, phi, (j, support, ys, query))
            names = list(theta)
            g = torch.autograd.grad(
                value, [at[n] for n in names], create_graph=True, allow_unused=True
            )
            theta = {
                n: theta[n] if gi is None else theta[n] - problem.inner_lr * gi
                for n, gi in zip(names, g)
            }
        out = functional_call(model, theta, (xq,))
        total = total + task_loss(problem.kind, out, yq).mean()
    return total / len(batch.x_support)


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def evaluate(
    problem: FewShotProblem, meta: Params, episodes, *, split: str, n: int, seed: int, chunk=50
) -> tuple[Tensor, Tensor]:
    """Per-episode (query loss, query accuracy — or MSE for regression) on ``n`` episodes of
    ``split``, drawn from ``seed``: adapted with the inner loop, no meta-gradient."""
    batch = episodes.sample(split, n, seed)
    detached = {k: v.detach() for k, v in meta.items()}
    losses, scores = [], []
    for a, b in chunks(n, chunk):
        part = EpisodeBatch(*(t[a:b] for t in batch))
        loss, score = batched_scores(problem, detached, part)
        losses.append(loss.detach())
        scores.append(score.detach())
    return torch.cat(losses), torch.cat(scores)


def episode_mean_ci(values: Tensor, z: float = 1.959964) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (z · sd / √n), the way
    the few-shot literature reports accuracies over hundreds of episodes. (Over a handful of
    seeds, :func:`metaloss.figures.mean_ci` gives the Student-t interval instead.)"""
    v = values.double()
    half = z * v.std(unbiased=True).item() / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return v.mean().item(), half

"""Meta-training and meta-testing MAML with an inner loss over an episode stream.

Meta-training: Adam on the meta-parameters (θ0 and φ) with the vectorised meta-gradient of
:func:`metaloss.fewshot.maml.meta_gradient`; meta-batch i is drawn from seed
``seed * 1_000_000 + i`` of the meta-train classes (a seed fixes the stream). Every
``val_every`` steps the meta-parameters are scored on one fixed set of meta-validation episodes
(the same for every inner loss: common episodes), and the best are kept (model selection on
meta-validation, never on meta-test). Meta-test: ``test_episodes`` episodes of the meta-test
classes, drawn from ``eval_seed`` — again the same episodes for every loss, so rows can be
compared episode by episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaloss.fewshot.maml import (
    FewShotProblem,
    Params,
    compiled_meta_gradient,
    episode_mean_ci,
    evaluate,
    meta_gradient,
)

STREAM = 1_000_000  # meta-batch i of seed s: episode seed s * STREAM + i


class MetaTrainingDiverged(RuntimeError):
    """The meta-loss, a meta-gradient or the meta-validation score is not finite: the run
    stops (exit 1 from the CLI) instead of returning meta-parameters that mean nothing."""


@dataclass
class FewShotResult:
    """The best meta-parameters (on meta-validation), when they were found, the history of
    (step, meta-train query loss, meta-train accuracy) and of (step, meta-val score)."""

    meta: Params
    best_step: int
    best_val: float
    train: list[tuple[int, float, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)


def check_finite(losses: Tensor, where: str) -> None:
    """A non-finite query loss of any episode means the inner loop diverged: accuracy alone
    (an argmax of NaN logits) would still look like a number."""
    bad = int((~torch.isfinite(losses)).sum())
    if bad:
        raise MetaTrainingDiverged(
            f"{where}: the query loss of {bad} of {len(losses)} episodes is not finite: the "
            "inner loop diverges (lower maml.inner_lr, or fewshot.lr)"
        )


def higher_is_better(kind: str) -> bool:
    return kind == "classification"  # accuracy; regression scores are query MSE


def meta_train(
    problem: FewShotProblem,
    episodes,
    meta: Params,
    *,
    steps: int,
    meta_batch: int,
    lr: float,
    seed: int,
    val_every: int,
    val_episodes: int,
    eval_seed: int = 0,
    clip_grad_norm: float | None = 10.0,
    log: Callable[[dict, int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    compile: bool = False,
) -> FewShotResult:
    """``steps`` Adam steps on the meta-parameters; the best on meta-validation (its episodes
    drawn from ``eval_seed``, the same for every loss) is returned (``compile``: the
    meta-gradient through ``torch.compile``). Interrupted (Ctrl-C, SIGTERM), the
    ``KeyboardInterrupt`` carries the best so far as ``.result``. The meta-gradient's norm
    is clipped to ``clip_grad_norm`` (None: not clipped).
    A non-finite meta-loss or meta-gradient raises :class:`MetaTrainingDiverged` (never a silent
    result)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in meta.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    better = higher_is_better(problem.kind)
    step_fn = (
        compiled_meta_gradient(problem) if compile else lambda m, b: meta_gradient(problem, m, b)
    )

    def score(at: int) -> float:
        losses, values = evaluate(
            problem, params, episodes, split="val", n=val_episodes, seed=eval_seed
        )
        check_finite(losses, f"meta-validation at meta-step {at}")
        return float(values.mean())

    best_val = score(0)
    result = FewShotResult({k: v.detach().clone() for k, v in params.items()}, 0, best_val)
    result.val.append((0, best_val))
    try:
        for i in range(1, steps + 1):
            batch = episodes.sample("train", meta_batch, seed * STREAM + i)
            grads, value, acc = step_fn(params, batch)
            bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
            if not torch.isfinite(value) or bad:
                raise MetaTrainingDiverged(
                    f"meta-step {i}: query loss {float(value)}; non-finite meta-gradient of "
                    f"{bad[:3]} (lower fewshot.lr or maml.inner_lr)"
                )
            opt.zero_grad(set_to_none=True)
            for k, p in params.items():
                p.grad = grads[k]
            if clip_grad_norm is not None:  # as the main engine's meta.clip_grad_norm
                torch.nn.utils.clip_grad_norm_(list(params.values()), clip_grad_norm)
            opt.step()
            result.train.append((i, float(value), float(acc)))
            if log is not None:
                log({"meta/query_loss": float(value), "meta/query_score": float(acc)}, i)
            if i % val_every == 0 or i == steps:
                v = score(i)
                result.val.append((i, v))
                if log is not None:
                    log({"meta/val_score": v}, i)
                if (v > result.best_val) if better else (v < result.best_val):
                    result.meta = {k: p.detach().clone() for k, p in params.items()}
                    result.best_step, result.best_val = i, v
            if progress is not None:
                progress(i)
    except KeyboardInterrupt as stop:  # Ctrl-C / SIGTERM: the caller can save what was found
        stop.result = result  # type: ignore[attr-defined]
        raise
    return result


def meta_test(
    problem: FewShotProblem, meta: Params, episodes, *, n: int, seed: int
) -> dict[str, float | list[float]]:
    """Mean score over ``n`` meta-test episodes with its 95% confidence interval."""
    losses, values = evaluate(problem, meta, episodes, split="test", n=n, seed=seed)
    check_finite(losses, "meta-test")
    mean, half = episode_mean_ci(values)
    return {"mean": mean, "ci95": half, "episodes": n, "per_episode": values.tolist()}

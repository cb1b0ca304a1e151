"""Shared by the benchmarks (scripts/bench_*.py): the benchmark problems and peak-RSS helpers."""

from __future__ import annotations

import resource


def setup(task_name: str, n_tasks: int, k: int, device: str):
    """(problem, meta-parameters, meta-batch, plain fixed loss) of a benchmark configuration:
    ``sine`` (ML3's setting) or ``mnist1d`` (TaylorGLO on an MLP, minibatches of 100)."""
    import torch

    from metaloss.hypergrad.base import MetaProblem, meta_params
    from metaloss.inner.optimizers import sgd
    from metaloss.losses import fixed
    from metaloss.losses.mlp import ML3Loss
    from metaloss.losses.taylor import TaylorGLO
    from metaloss.models import mlp
    from metaloss.sampling import sample_meta_batch
    from metaloss.tasks.classification import mnist1d
    from metaloss.tasks.regression import sine
    from metaloss.train import build_model

    torch.manual_seed(0)
    if task_name == "sine":  # ML3's setting: MLP 1-40-40-1, loss MLP 2-50-50-1, 100 points
        tasks = [sine(seed=s) for s in range(n_tasks)]
        factory = lambda **kw: mlp(hidden=[40, 40], **kw)  # noqa: E731
        loss, objective, plain_loss, batch_size = (
            ML3Loss(hidden=(50, 50)),
            fixed.mse,
            fixed.mse,
            None,
        )
    else:  # MNIST-1D MLP 40-100-100-10 with TaylorGLO, minibatches of 100
        tasks = [mnist1d()]
        factory = lambda **kw: mlp(hidden=[100, 100], **kw)  # noqa: E731
        loss, objective, plain_loss, batch_size = TaylorGLO(), fixed.ce, fixed.ce, 100
    gen = torch.Generator().manual_seed(0)
    batch = sample_meta_batch(
        tasks,
        factory,
        n_tasks=n_tasks,
        inner_steps=k,
        inner_batch=batch_size,
        val_batch=batch_size,
        gen=gen,
    )
    batch = type(batch)(
        {n: v.to(device) for n, v in batch.theta0.items()}, *(t.to(device) for t in batch[1:])
    )
    model = build_model(factory, tasks[0], 0).to(device)
    problem = MetaProblem(model, loss.to(device), sgd(lr=0.01), k, objective, tasks[0].class_counts)
    return problem, meta_params(problem.loss), batch, plain_loss


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> int:
    """Reset Linux's VmHWM (peak RSS) to the current RSS; return the current RSS in KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status_kib("VmRSS")

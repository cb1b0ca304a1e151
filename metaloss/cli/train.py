"""`metaloss-train`: train one model with one loss on one task, evaluate on the test split.

metaloss-train task=mnist1d model=cnn1d loss=focal optim=adam seed=3
metaloss-train -m loss=mse,mae,huber seed=0,1,2,3,4 task=outliers
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.conf import HydraConf
from hydra.utils import instantiate
from omegaconf import DictConfig

from metaloss import runtime
from metaloss.cli import own_loop
from metaloss.cli.app import hydra_command, output_dir, run_command
from metaloss.cli.logger import open_logger, write_json
from metaloss.config import DEFAULT_LOSS, check_loss, instantiate_loss, loss_option
from metaloss.metrics import train_result_names
from metaloss.runs import RunDir, hydra_record
from metaloss.train import NonFiniteLoss, build_model, train_model
from metaloss.train_many import train_many
from metaloss.validate import check_against_task

log = logging.getLogger("metaloss")


def run(cfg: DictConfig, out_dir: Path, loss_name: str | None = None) -> float:
    """The app body, callable without Hydra's launcher (tests compose a config and call it).
    Settings are checked and the run directory claimed before any data is made."""
    return run_command(cfg, out_dir, "train", functools.partial(_work, loss_name=loss_name))


def _work(
    cfg: DictConfig,
    run_dir: RunDir,
    device: torch.device,
    dtype: torch.dtype,
    loss_name: str | None,
) -> float:
    if own_loop.is_own_loop(cfg.task):  # GANs, policy gradients: the task's loop trains
        return own_loop.train(cfg, run_dir, instantiate(cfg.task), loss_name)
    torch.manual_seed(cfg.seed)
    with runtime.canonical_draws():  # the same data in a float32 and a float64 run
        task = instantiate(cfg.task)
    task = task.to(device, dtype)
    check_against_task(cfg, task)
    metric = cfg.metric or task.primary_metric
    if cfg.get("loss") is None:  # no loss chosen: the task kind's default, like metrics
        loss_name = DEFAULT_LOSS[task.kind]
        loss = loss_option(loss_name, task, cfg)
    else:
        with runtime.canonical_draws():
            loss = instantiate_loss(cfg.loss, task)
    if isinstance(loss, torch.nn.Module):
        loss = loss.to(device=device, dtype=dtype)
    check_loss(loss, task, loss_name, cfg)  # fits the task kind (and its trained task)
    if int(cfg.seeds) > 1:
        return _run_seeds(cfg, run_dir, task, loss, loss_name, metric)
    return _run_one(cfg, run_dir, task, loss, loss_name, metric)


def _run_one(
    cfg: DictConfig, run_dir: RunDir, task: Any, loss: Any, loss_name: str | None, metric: str
) -> float:
    """One seed, trained with the torch.optim twin of the functional optimizer."""
    model = build_model(instantiate(cfg.model), task, cfg.seed)
    make_optimizer = instantiate(cfg.optim).torch_equivalent
    run_dir.record(hydra_record(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("task %s | loss %s | model %d params", task.describe(), loss_name, n_params)
    with open_logger(
        cfg, run_dir.path, job_type="train", name=f"{loss_name}-s{cfg.seed}"
    ) as logger:
        metrics = train_model(
            task,
            model,
            loss,
            make_optimizer,
            steps=cfg.train.steps,
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            eval_every=cfg.train.eval_every,
            log=logger.log,
            progress=cfg.progress,
            desc=f"{loss_name} seed {cfg.seed}",
        )
        logger.log(metrics, step=cfg.train.steps)
        logger.summary(metrics)
    record = {"loss": loss_name, "task": task.name, "seed": cfg.seed, "metric": metric}
    write_json(run_dir.path / "metrics.json", {**record, "metrics": metrics})
    log.info("%s", "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return float(metrics[metric])


def _run_seeds(
    cfg: DictConfig, run_dir: RunDir, task, loss, loss_name: str | None, metric: str
) -> float:
    """``seeds=N``: seeds ``seed .. seed+N-1`` trained as one ``vmap`` in this process, with
    the functional optimizer of ``optim`` (equal to its torch.optim twin, tested); one
    metrics.json entry per seed, each the result a single run with that seed gives. A diverged
    seed is written as null, then the run stops with an error naming it (like a single diverged
    run)."""
    functional = instantiate(cfg.optim)  # equal to its torch.optim twin (tested)
    seeds = [int(cfg.seed) + i for i in range(int(cfg.seeds))]
    run_dir.record(hydra_record(cfg))
    log.info("task %s | loss %s | seeds %s as one vmap", task.describe(), loss_name, seeds)
    results = train_many(
        [task] * len(seeds),
        seeds,
        instantiate(cfg.model),
        loss,
        functional,
        steps=cfg.train.steps,
        batch_size=cfg.train.batch_size,
    )
    keys = train_result_names(task.kind)
    runs: list[dict[str, Any]] = [
        {"seed": s, "metrics": m if m is not None else dict.fromkeys(keys, float("nan"))}
        for s, m in zip(seeds, results)
    ]
    with open_logger(
        cfg, run_dir.path, job_type="train", name=f"{loss_name}-s{seeds[0]}x{len(seeds)}"
    ) as logger:
        for r in runs:
            logger.summary({f"seed{r['seed']}/{k}": v for k, v in r["metrics"].items()})
    values = [r["metrics"][metric] for r in runs]
    record = {"loss": loss_name, "task": task.name, "seed": seeds[0], "seeds": seeds}
    write_json(run_dir.path / "metrics.json", {**record, "metric": metric, "runs": runs})
    for r in runs:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
        log.info("seed %d: %s", r["seed"], shown)
    diverged = [s for s, m in zip(seeds, results) if m is None]
    if diverged:
        raise NonFiniteLoss(
            f"training diverged (NaN/inf loss) for seed(s) {diverged}; their metrics are null in "
            f"{run_dir.path / 'metrics.json'}"
        )
    return float(sum(values) / len(values))


def _app(cfg: DictConfig, hc: HydraConf) -> float:
    return run(cfg, output_dir(hc), hc.runtime.choices.get("loss"))


main = hydra_command("train", _app)

if __name__ == "__main__":
    main()

"""`metaloss-eval`: meta-test a saved learned loss against baselines, without meta-training.

    metaloss-eval loss_path=outputs/meta/<date>/learned_loss.pt  # task, model, optim: the file's
    metaloss-eval experiment=ml3_sine loss_path=outputs/meta/<date>/learned_loss.pt

The task, model and inner optimizer the command line does not set are the ones the file
records (its meta-training run's); a task other than the recorded one is refused unless
``allow_other_task=true``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from hydra.conf import HydraConf
from hydra.utils import instantiate
from omegaconf import DictConfig

from metaloss.cli import own_loop
from metaloss.cli.app import hydra_command, output_dir, run_command
from metaloss.cli.comparison import check_tuned, run_meta_test
from metaloss.cli.logger import open_logger
from metaloss.config import check_loss, setup_from_file
from metaloss.losses.io import load_learned_loss
from metaloss.runs import RunDir, hydra_record
from metaloss.runtime import task_pool
from metaloss.validate import check_against_task, check_config


def run(cfg: DictConfig, out_dir: Path, given: set[str] | None = None) -> dict:
    """``given``: the keys the command line set (:func:`given_keys`); the task, model and inner
    optimizer it does not choose are taken from the learned-loss file, with the command line's
    own settings of them (``optim.lr=...``) applied over the file's
    (:func:`metaloss.config.setup_from_file`). None: all of them are taken from ``cfg``."""
    check_config(cfg)
    learned = load_learned_loss(
        cfg.loss_path,
        trusted_modules=list(cfg.trusted_modules),
        allow_other_task=bool(cfg.allow_other_task),
    )
    own_loop.refuse_in("eval", cfg.task, learned)
    if given is not None:  # the file's values pass the same rules as the command line's
        cfg = setup_from_file(cfg, getattr(learned, "meta", {}), given, str(cfg.loss_path))
    return run_command(cfg, out_dir, "eval", functools.partial(_work, learned=learned))


def given_keys(overrides: list[str]) -> set[str]:
    """The keys a Hydra command line sets: ``task=mnist1d`` chooses the group ``task``,
    ``task.n_train=100`` and ``+task.x=1`` set one value inside whichever task is used (the
    file's, when no ``task=`` is given); ``experiment=...`` sets everything an experiment may."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def _work(
    cfg: DictConfig, run_dir: RunDir, device: torch.device, dtype: torch.dtype, learned: Any
) -> dict:
    out_dir = run_dir.path
    torch.manual_seed(cfg.seed)
    learned = learned.to(device, dtype)
    pool = [t.to(device, dtype) for t in task_pool(cfg)]
    check_loss(learned, pool[0], f"learned ({cfg.loss_path})", cfg)
    check_against_task(cfg, pool[0])
    check_tuned(cfg, pool, instantiate(cfg.optim))  # another setup's tuned.json: refused now
    run_dir.record(hydra_record(cfg))
    with open_logger(cfg, out_dir, job_type="eval", name=f"eval-{pool[0].name}") as logger:
        learned_lr = (getattr(learned, "meta", None) or {}).get("inner_lr")  # meta-learned
        return run_meta_test(
            cfg, learned, pool, instantiate(cfg.optim), out_dir, logger, learned_lr=learned_lr
        )


def _app(cfg: DictConfig, hc: HydraConf) -> float | None:
    out = run(cfg, output_dir(hc), given_keys(list(hc.overrides.task)))
    return (out.get("significance") or {}).get("learned_mean")


main = hydra_command("eval", _app)

if __name__ == "__main__":
    main()

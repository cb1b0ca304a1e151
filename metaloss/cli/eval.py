"""`metaloss-eval`: meta-test a saved learned loss against baselines, without meta-training.

    metaloss-eval loss_path=outputs/meta/<date>/learned_loss.pt      # task, model, optim: the file's
    metaloss-eval experiment=ml3_sine loss_path=outputs/meta/<date>/learned_loss.pt

The task, model and inner optimizer the command line does not set are the ones the file
records (its meta-training run's); a task other than the recorded one is refused unless
``allow_other_task=true``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from metaloss import runtime
from metaloss.cli.comparison import check_tuned, run_meta_test
from metaloss.cli.logger import open_logger
from metaloss.cli.meta import task_pool
from metaloss.cli.signals import console, exit_on_interrupt, interruptible
from metaloss.cli.train import LOCAL_KEYS
from metaloss.config import check_loss, conf_dir, setup_from_file
from metaloss.losses.io import load_learned_loss
from metaloss.runs import RunDir, hydra_record, identity
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
    if given is not None:
        from_file = setup_from_file(cfg, getattr(learned, "meta", {}), given, str(cfg.loss_path))
        if from_file is not cfg:
            cfg = from_file
            check_config(cfg)  # the file's values pass the same rules as the command line's
    device, dtype = runtime.setup(cfg)
    with RunDir(out_dir, "eval", identity(cfg, ignore=LOCAL_KEYS)) as run_dir, interruptible():
        return _run(cfg, run_dir, learned, device, dtype)


def given_keys(overrides: list[str]) -> set[str]:
    """The keys a Hydra command line sets: ``task=mnist1d`` chooses the group ``task``,
    ``task.n_train=100`` and ``+task.x=1`` set one value inside whichever task is used (the
    file's, when no ``task=`` is given); ``experiment=...`` sets everything an experiment may."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def _run(
    cfg: DictConfig, run_dir: RunDir, learned, device: torch.device, dtype: torch.dtype
) -> dict:
    out_dir = run_dir.path
    torch.manual_seed(cfg.seed)
    learned = learned.to(device, dtype)
    pool = [t.to(device, dtype) for t in task_pool(cfg)]
    check_loss(learned, pool[0], f"learned ({cfg.loss_path})", cfg)
    check_against_task(cfg, pool[0])
    check_tuned(
        cfg, pool, instantiate(cfg.optim)
    )  # a tuned.json for another setup: refused before training
    run_dir.record(hydra_record(cfg))
    with open_logger(cfg, out_dir, job_type="eval", name=f"eval-{pool[0].name}") as logger:
        return run_meta_test(cfg, learned, pool, instantiate(cfg.optim), out_dir, logger)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    with exit_on_interrupt():
        out = run(cfg, Path(hc.runtime.output_dir), given_keys(list(hc.overrides.task)))
    return (out.get("significance") or {}).get("learned_mean")


def main() -> None:
    """The console script (SIGTERM forwarded to parallel jobs, exit 128 + signal)."""
    console(_hydra_main)


if __name__ == "__main__":
    main()

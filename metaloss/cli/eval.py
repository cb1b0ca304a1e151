"""`metaloss-eval`: meta-test a saved learned loss against baselines, without meta-training.

    metaloss-eval experiment=ml3_sine loss_path=outputs/meta/<date>/learned_loss.pt
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
from metaloss.cli.meta import _task_pool
from metaloss.cli.signals import console, exit_on_interrupt, interruptible
from metaloss.cli.train import LOCAL_KEYS
from metaloss.config import check_loss_fits, conf_dir
from metaloss.losses.io import load_learned_loss
from metaloss.runs import RunDir, hydra_record, identity
from metaloss.validate import check_against_task, check_config


def run(cfg: DictConfig, out_dir: Path) -> dict:
    check_config(cfg)
    device, dtype = runtime.setup(cfg)
    with RunDir(out_dir, "eval", identity(cfg, ignore=LOCAL_KEYS)) as run_dir, interruptible():
        return _run(cfg, run_dir, device, dtype)


def _run(cfg: DictConfig, run_dir: RunDir, device: torch.device, dtype: torch.dtype) -> dict:
    out_dir = run_dir.path
    torch.manual_seed(cfg.seed)
    learned = load_learned_loss(cfg.loss_path, trusted_modules=list(cfg.trusted_modules)).to(device, dtype)
    pool = [t.to(device, dtype) for t in _task_pool(cfg)]
    check_loss_fits(learned, pool[0].kind, pool[0].name, f"learned ({cfg.loss_path})")
    check_against_task(cfg, pool[0])
    check_tuned(cfg, pool, instantiate(cfg.optim))  # a tuned.json for another setup: refused before training
    run_dir.record(hydra_record(cfg))
    with open_logger(cfg, out_dir, job_type="eval", name=f"eval-{pool[0].name}") as logger:
        return run_meta_test(cfg, learned, pool, instantiate(cfg.optim), out_dir, logger)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    with exit_on_interrupt():
        out = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return (out.get("significance") or {}).get("learned_mean")


def main() -> None:
    """The console script (SIGTERM forwarded to parallel jobs, exit 128 + signal)."""
    console(_hydra_main)


if __name__ == "__main__":
    main()

"""`metaloss-meta`: meta-train a parametric loss, then meta-test it against the baselines.

    metaloss-meta                                    # the quickstart experiment (make run)
    metaloss-meta experiment=ml3_sine
    metaloss-meta task=mnist1d model=mlp loss=taylorglo hypergrad=unrolled inner_optim=sgd
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from metaloss.cli.comparison import run_meta_test
from metaloss.cli.logger import open_logger
from metaloss.config import (
    DEFAULT_OBJECTIVE,
    baselines_for,
    check_loss_fits,
    conf_dir,
    instantiate_loss,
    loss_option,
)
from metaloss.hypergrad.base import MetaProblem
from metaloss.losses.base import ParametricLoss
from metaloss.losses.io import atomic_save, save_learned_loss
from metaloss.meta import MetaLearner, offline_steps, online_steps
from metaloss.plots import plot_losses
from metaloss.sampling import sample_meta_batch
from metaloss.train import build_model

log = logging.getLogger("metaloss")
CKPT_FORMAT = "metaloss.checkpoint/1"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run's loss."""


def _task_pool(cfg: DictConfig) -> list:
    first = instantiate(cfg.task)
    if not first.distribution:
        return [first]
    base = int(cfg.task.seed)
    return [first] + [instantiate(cfg.task, seed=base + i) for i in range(1, int(cfg.meta.train_tasks))]


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpoint(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it or "
                                "set meta.resume_from to another one") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CorruptCheckpoint(f"{path} is not a metaloss checkpoint")
    return ckpt


def _restore(resume_from: str | None, ckpt_path: Path, learner: MetaLearner, gen: torch.Generator) -> int:
    """Load φ, meta-optimizer and RNG state from ``resume_from`` (a checkpoint or its run
    dir) or from an existing ``ckpt_path``; return the completed outer steps (0: fresh)."""
    resume = Path(resume_from) if resume_from else ckpt_path
    if resume.is_dir():
        resume = resume / "checkpoint.pt"
    if resume_from and not resume.is_file():
        raise FileNotFoundError(f"meta.resume_from: no checkpoint at {resume}")
    if not resume.is_file():
        return 0
    ckpt = _load_checkpoint(resume)
    try:
        learner.load_state_dict(ckpt["learner"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CorruptCheckpoint(f"{resume} does not match this loss/optimizer: {e}") from e
    gen.set_state(ckpt["rng"])
    log.info("resumed from %s at outer step %d", resume, int(ckpt["step"]))
    return int(ckpt["step"])


def _meta_loop(bar, done: dict, logger, loss, baselines, task, loss_name, out_dir, mc,
               save_checkpoint) -> None:
    """Drive the outer-step generator: log, draw the learned loss, checkpoint.
    ``done["step"]`` always holds the number of completed outer steps."""
    for step, metrics in bar:
        done["step"] = step
        if metrics:
            logger.log(metrics, step=step)
            bar.set_postfix(obj=f"{metrics['meta/val_objective']:.4g}", refresh=False)
        if step % mc.plot_every == 0 or step == mc.steps:
            png = plot_losses({"learned": loss, **baselines}, task.kind, out_dir / "learned_loss.png",
                              num_classes=task.num_classes, title=f"{loss_name} after {step} steps")
            logger.image("meta/learned_loss", png, step=step)
        if step % mc.checkpoint_every == 0:
            save_checkpoint(step)


def run(cfg: DictConfig, out_dir: Path, loss_name: str | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = _task_pool(cfg)
    task = pool[0]
    loss = instantiate_loss(cfg.loss, task)
    if not isinstance(loss, ParametricLoss):
        raise ValueError(f"metaloss-meta needs a parametric loss, got {loss_name!r}; choose one of "
                         "ml3, taylorglo, poly_n, logit_adjusted, adaptive_robust, learned_smoothing "
                         "(fixed losses go in `compare:`)")
    check_loss_fits(loss, task.kind, task.name, loss_name)
    factory = instantiate(cfg.model)
    inner_opt = instantiate(cfg.inner_optim)
    objective = loss_option(cfg.meta.objective or DEFAULT_OBJECTIVE[task.kind], task)
    # Class-weighted objectives (e.g. meta.objective=weighted_ce) weigh by the validation
    # split's class counts: a balanced validation objective, as AutoBalance uses.
    val_counts = (torch.bincount(task.y_val.long(), minlength=task.num_classes or 2)
                  if task.class_counts is not None else None)
    problem = MetaProblem(build_model(factory, task, 0), loss, inner_opt, int(cfg.meta.inner_steps),
                          objective, task.class_counts, {"class_counts": val_counts})
    hypergrad = instantiate(cfg.hypergrad)
    learner = MetaLearner(loss, instantiate(cfg.meta_optim), learn_inner_lr=cfg.meta.learn_inner_lr,
                          inner_lr=inner_opt.hparams["lr"], clip_grad_norm=cfg.meta.clip_grad_norm,
                          max_bad_steps=cfg.meta.max_bad_steps)
    ckpt_path = out_dir / "checkpoint.pt"
    start = _restore(cfg.meta.resume_from, ckpt_path, learner, gen)

    def save_checkpoint(step: int) -> None:
        atomic_save({"format": CKPT_FORMAT, "step": step, "learner": learner.state_dict(),
                     "rng": gen.get_state()}, ckpt_path)

    baselines = baselines_for(cfg.compare, task)
    mc = cfg.meta
    if mc.mode == "offline":
        def sample():
            return sample_meta_batch(pool, factory, n_tasks=mc.tasks_per_step, inner_steps=mc.inner_steps,
                                     inner_batch=mc.inner_batch, val_batch=mc.val_batch, gen=gen,
                                     val_from_train=mc.val_from_train)
        steps = offline_steps(learner, problem, hypergrad, sample, steps=mc.steps, start=start)
    elif mc.mode == "online":
        steps = online_steps(learner, problem, hypergrad, task, factory, steps=mc.steps,
                             update_every=mc.online_update_every, batch_size=mc.inner_batch,
                             val_batch=mc.val_batch, gen=gen, start=start)
    else:
        raise ValueError(f"meta.mode must be 'offline' or 'online', got {mc.mode!r}")

    log.info("meta-training %s on %s | %s, %s, K=%d, T=%d, %d steps", loss_name, task.describe(),
             type(hypergrad).__name__, inner_opt.name, mc.inner_steps, mc.tasks_per_step, mc.steps)
    with open_logger(cfg, out_dir, job_type="meta", name=f"{loss_name}-{task.name}-s{cfg.seed}") as logger:
        bar = tqdm(steps, total=mc.steps - start, desc=f"meta {loss_name}", disable=not cfg.progress,
                   mininterval=1.0)
        done = {"step": start}
        try:
            _meta_loop(bar, done, logger, loss, baselines, task, loss_name, out_dir, mc, save_checkpoint)
        except BaseException:  # a NaN streak, Ctrl-C, ...: keep the work done so far
            save_checkpoint(done["step"])
            log.error("meta-training stopped after outer step %d; checkpoint saved to %s (resume with "
                      "meta.resume_from=%s)", done["step"], ckpt_path, out_dir)
            raise
        save_checkpoint(done["step"])
        learned_path = save_learned_loss(loss, out_dir / "learned_loss.pt", task=task.name, steps=mc.steps,
                                         loss_name=loss_name)
        log.info("learned loss saved to %s (metaloss-eval loss_path=%s)", learned_path, learned_path)
        result = {"learned_loss": str(learned_path), "skipped_steps": learner.skipped}
        if cfg.meta_test.enabled:
            frozen = loss.requires_grad_(False)
            result.update(run_meta_test(cfg, frozen, pool, inner_opt, out_dir, logger))
    return result


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="meta")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    out = run(cfg, Path(hc.runtime.output_dir), hc.runtime.choices.get("loss"))
    sig = out.get("significance") or {}
    return sig.get("learned_mean")


if __name__ == "__main__":
    main()

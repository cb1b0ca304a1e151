"""`metaloss-meta`: meta-train a parametric loss, then meta-test it against the baselines.

metaloss-meta                                    # the quickstart experiment (make run)
metaloss-meta experiment=ml3_sine
metaloss-meta task=mnist1d model=mlp loss=taylorglo hypergrad=unrolled optim=sgd
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.conf import HydraConf
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from metaloss import distributed, keys, runtime, selection
from metaloss.checkpoint import RunState, resume, save_checkpoint
from metaloss.cli import own_loop
from metaloss.cli.app import hydra_command, output_dir, run_command
from metaloss.cli.comparison import check_tuned, run_meta_test, tasks_for_seed_fn
from metaloss.cli.logger import NullLogger, open_logger, write_json
from metaloss.cli.signals import checkpoint_requested, critical
from metaloss.config import (
    DEFAULT_OBJECTIVE,
    baselines_for,
    check_loss,
    instantiate_loss,
    loss_option,
    parametric_losses,
    training_setup,
)
from metaloss.hypergrad.base import MetaProblem
from metaloss.losses.base import ParametricLoss
from metaloss.losses.io import save_learned_loss
from metaloss.meta import (
    MetaLearner,
    NonFiniteMetaGradient,
    OnlineState,
    check_progress,
    offline_steps,
    online_steps,
)
from metaloss.outer import OuterOptimizer, build_outer
from metaloss.plots import plot_losses
from metaloss.runs import fingerprint, hydra_record, identity, split_applied
from metaloss.runtime import task_pool
from metaloss.sampling import sample_meta_batch
from metaloss.train import build_model
from metaloss.tune import learned_loss_cost
from metaloss.validate import ConfigError, check_against_task

log = logging.getLogger("metaloss")


@dataclass
class MetaRun:
    """One meta-training run, assembled from its config: what the outer loop drives."""

    cfg: DictConfig
    pool: list
    loss: ParametricLoss
    loss_name: str | None
    factory: Any
    inner_opt: Any
    problem: MetaProblem
    hypergrad: Any
    learner: OuterOptimizer
    baselines: dict
    make_meta_optimizer: Any
    gen: torch.Generator
    fit_pool: list  # the tasks the outer objective reads (without the held-out selection rows)
    select_pool: list | None  # their held-out selection splits (meta.selection.frac > 0)

    @property
    def task(self) -> Any:
        return self.pool[0]

    def sample_batch(self, gen: torch.Generator, n_tasks: int) -> Any:
        mc = self.cfg.meta
        return sample_meta_batch(
            self.fit_pool,
            self.factory,
            n_tasks=n_tasks,
            inner_steps=mc.inner_steps,
            inner_batch=mc.inner_batch,
            val_batch=mc.val_batch,
            gen=gen,
            val_from_train=mc.val_from_train,
        )


def run(cfg: DictConfig, out_dir: Path, loss_name: str | None = None) -> dict:
    """The app body: settings checked, run directory claimed, then meta-training and the
    meta-test. Callable without Hydra's launcher (tests compose a config and call it)."""

    # Resuming into its own directory with a new meta learning rate is allowed; any other
    # change means the directory belongs to another run. (Read when a difference is found,
    # after run_command has checked the settings.)
    def allow(diff: dict) -> bool:
        return _resumes_here(cfg, Path(out_dir)) and not split_applied(diff)[1]

    try:  # only rank 0 owns the directory, logs and writes; the others compute their share
        return run_command(
            cfg,
            Path(out_dir),
            "meta",
            functools.partial(_work, loss_name=loss_name),
            ignore=keys.continuation(online=cfg.meta.mode == "online"),
            allow=allow,
            claim=functools.partial(_join, cfg),
        )
    finally:
        distributed.finish()


def _resumes_here(cfg: DictConfig, out_dir: Path) -> bool:
    """``meta.resume_from`` names this run directory (or a checkpoint in it)."""
    if cfg.meta.resume_from is None:
        return False
    explicit = Path(cfg.meta.resume_from).expanduser()
    return (explicit if explicit.is_dir() else explicit.parent).resolve() == out_dir.resolve()


def _join(cfg: DictConfig, device: torch.device) -> bool:
    """Join the torchrun world (a world of one without torchrun); True on the rank that owns
    the run directory."""
    world = distributed.init(device)
    if world.size > 1 and not world.is_writer:  # only rank 0 writes the run's log file
        for h in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(h)
    if world.size > 1 and cfg.meta.mode == "online":
        raise ConfigError(
            "meta.mode = 'online' follows one training trajectory and cannot be split across "
            f"{world.size} processes; launch it without torchrun"
        )
    if world.size > cfg.meta.tasks_per_step:
        raise ConfigError(
            f"meta.tasks_per_step = {cfg.meta.tasks_per_step}: must be >= the number of "
            f"processes ({world.size}), each of which runs a share of the tasks"
        )
    return world.is_writer


def _work(
    cfg: DictConfig, run_dir: Any, device: torch.device, dtype: torch.dtype, loss_name: str | None
) -> dict:
    if own_loop.is_own_loop(cfg.task):  # GANs, policy gradients: CMA-ES over the task's loop
        return own_loop.meta(cfg, run_dir, instantiate(cfg.task), loss_name)
    world = distributed.init(device)  # joined already (_join): this only reads it
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # sampling RNG: CPU, the same on every device
    pool = [t.to(device, dtype) for t in task_pool(cfg)]
    check_against_task(cfg, pool[0])
    loss = _parametric_loss(cfg, pool[0], loss_name, device, dtype)
    run = _assemble(cfg, pool, loss, loss_name, gen, world)
    if (
        cfg.meta_test.enabled
    ):  # fail now, not after meta-training, if the test tasks cannot be built
        tasks_for_seed_fn(cfg, pool)(0)
        check_tuned(cfg, pool, run.inner_opt)  # a tuned.json for another setup: refused now
    mc = cfg.meta
    online = (
        OnlineState.fresh(run.problem, run.task, run.factory, mc.inner_batch, gen)
        if mc.mode == "online"
        else None
    )
    ident = identity(cfg, ignore=keys.continuation(online=mc.mode == "online"))
    state = RunState(run.learner, gen, run.hypergrad, online, ident)
    start = resume(cfg, run_dir.path, state, run.make_meta_optimizer)
    run_dir.record(hydra_record(cfg))
    meta_info = {
        "task": run.task.name,
        "loss_name": loss_name,
        "fingerprint": fingerprint(ident),
        "setup": training_setup(cfg),  # metaloss-eval takes task/model/optim from it
    }
    log.info(
        "meta-training %s on %s | %s, %s, K=%d, T=%d, %d steps | %s, %s, %d thread(s)",
        loss_name,
        run.task.describe(),
        _method(run),
        run.inner_opt.name,
        mc.inner_steps,
        mc.tasks_per_step,
        mc.steps,
        device,
        str(dtype).replace("torch.", ""),
        torch.get_num_threads(),
    )
    return _train_and_test(run, state, start, online, run_dir.path, meta_info, world)


def _method(run: MetaRun) -> str:
    """What searches φ, for the log: the hypergradient method, or a derivative-free search."""
    if run.learner.outer == "gradient":
        return type(run.hypergrad).__name__
    return {"cmaes": "CMA-ES"}.get(run.learner.outer, run.learner.outer)


def _parametric_loss(
    cfg: DictConfig, task: Any, loss_name: str | None, device: torch.device, dtype: torch.dtype
) -> ParametricLoss:
    """The loss to meta-train, as ``cfg.loss`` says, refused unless it can be."""
    with runtime.canonical_draws():  # a random initial φ (ML3) is the same in either dtype
        loss = instantiate_loss(cfg.loss, task)
    if isinstance(loss, torch.nn.Module):
        loss = loss.to(device=device, dtype=dtype)
    if cfg.loss.get("_target_", "").endswith("load_learned_loss") and cfg.loss.get("frozen", True):
        raise ConfigError(
            "loss = learned with loss.frozen = true cannot be meta-trained; set "
            "loss.frozen=false to continue meta-training a saved loss (or use metaloss-eval to "
            "test it)"
        )
    if not isinstance(loss, ParametricLoss):
        raise ConfigError(
            f"metaloss-meta needs a parametric loss, got {loss_name!r}; choose one of "
            f"{', '.join(parametric_losses(cfg))} (fixed losses go in `compare:`)"
        )
    check_loss(loss, task, loss_name, cfg)  # kind, trained task (a saved loss), one value each
    return loss


def _assemble(
    cfg: DictConfig,
    pool: list,
    loss: ParametricLoss,
    loss_name: str | None,
    gen: torch.Generator,
    world: distributed.World,
) -> MetaRun:
    """The inner problem, the hypergradient method and the outer learner around ``loss``."""
    task = pool[0]
    factory = instantiate(cfg.model)
    inner_opt = instantiate(cfg.optim)
    objective = loss_option(cfg.meta.objective or DEFAULT_OBJECTIVE[task.kind], task, cfg)
    # Class-weighted objectives (e.g. meta.objective=weighted_ce) weigh by the validation
    # split's class counts: a balanced validation objective, as AutoBalance uses.
    val_counts = (
        torch.bincount(task.y_val.long(), minlength=task.num_classes or 2)
        if task.class_counts is not None
        else None
    )
    problem = MetaProblem(
        build_model(factory, task, 0),
        loss,
        inner_opt,
        int(cfg.meta.inner_steps),
        objective,
        task.class_counts,
        {"class_counts": val_counts},
    )
    hypergrad = instantiate(cfg.hypergrad)
    if world.size > 1:
        hypergrad = distributed.Sharded(hypergrad, world)
    make_meta_optimizer = instantiate(cfg.meta_optim)
    learner = _learner(cfg, loss, make_meta_optimizer, inner_opt, task.kind, world)
    baselines = baselines_for(cfg.compare, task, cfg)
    frac = float(cfg.meta.selection.frac)
    split = [selection.split_validation(t, frac) for t in pool] if frac > 0 else None
    return MetaRun(
        cfg, pool, loss, loss_name, factory, inner_opt, problem, hypergrad, learner, baselines,
        make_meta_optimizer, gen,
        fit_pool=[f for f, _ in split] if split else pool,
        select_pool=[s for _, s in split] if split else None,
    )  # fmt: skip


def _learner(
    cfg: DictConfig,
    loss: ParametricLoss,
    make_meta_optimizer: Any,
    inner_opt: Any,
    kind: str,
    world: distributed.World,
) -> OuterOptimizer:
    """The outer optimizer ``meta_optim`` names (:func:`metaloss.outer.build_outer`): one that
    builds itself from the run (CMA-ES), else the gradient learner with that torch optimizer."""
    return build_outer(
        make_meta_optimizer,
        loss,
        cfg,
        kind,
        world.size,
        gradient=lambda: MetaLearner(
            loss,
            make_meta_optimizer,
            learn_inner_lr=cfg.meta.learn_inner_lr,
            inner_lr=inner_opt.hparams["lr"],
            clip_grad_norm=cfg.meta.clip_grad_norm,
            max_bad_steps=cfg.meta.max_bad_steps,
        ),
    )


def _outer_steps(run: MetaRun, online: OnlineState | None, start: int) -> Any:
    """The outer-step generator: offline (fresh tasks each step) or online (one trajectory)."""
    mc = run.cfg.meta
    if online is None:
        return offline_steps(
            run.learner,
            run.problem,
            run.hypergrad,
            lambda: run.sample_batch(run.gen, mc.tasks_per_step),
            steps=mc.steps,
            start=start,
        )
    return online_steps(
        run.learner,
        run.problem,
        run.hypergrad,
        run.task,
        online,
        steps=mc.steps,
        update_every=mc.online_update_every,
        val_batch=mc.val_batch,
        gen=run.gen,
        start=start,
    )


def _train_and_test(
    run: MetaRun,
    state: RunState,
    start: int,
    online: OnlineState | None,
    out_dir: Path,
    meta_info: dict,
    world: distributed.World,
) -> dict:
    """Meta-train (checkpointing, logging, keeping the last good φ if it diverges), save the
    learned loss, then meta-test it (rank 0 only)."""
    cfg, mc = run.cfg, run.cfg.meta
    writer = world.is_writer
    save = functools.partial(_save_checkpoint, out_dir / "checkpoint.pt", writer)
    logging_cm = (
        open_logger(
            cfg, out_dir, job_type="meta", name=f"{run.loss_name}-{run.task.name}-s{cfg.seed}"
        )
        if writer
        else nullcontext(NullLogger())
    )
    with logging_cm as logger:
        last = {"state": state.capture(start)}
        t0 = time.perf_counter()
        try:
            _meta_loop(run, state, last, logger, out_dir, save, writer, start, online)
            notes = [run.learner.finish()]  # no step ever finite: NonFiniteMetaGradient
        except BaseException as e:  # a NaN streak, Ctrl-C, SIGTERM, ...: keep the work done
            if isinstance(e, NonFiniteMetaGradient):  # every rank stops here at the same step
                distributed.leave(world)
            save(last["state"])
            if writer:
                _report_stop(e, run, last["state"]["step"], out_dir, meta_info, logger)
            raise
        distributed.leave(world)  # the collective work is done: every rank tears down together
        save(last["state"])
        elapsed = time.perf_counter() - t0
        log.info(
            "meta-training: %d outer steps in %.2f s (%.4f s/step)",
            mc.steps - start,
            elapsed,
            elapsed / max(1, mc.steps - start),
        )
        if not writer:
            return {"rank": world.rank, "skipped_steps": run.learner.skipped}
        notes.append(_check_progress(run, last))
        chosen = _select(run, state, last, out_dir, logger)
        step = (chosen.get("selection") or {}).get("chosen_step")  # the kept φ's own step
        steps = mc.steps if step is None else int(step)
        return {**_save_and_test(run, out_dir, meta_info, logger, notes, steps), **chosen}


def _save_checkpoint(path: Path, writer: bool, snapshot: dict) -> None:
    if writer:
        with critical():  # a signal waits until the checkpoint is whole
            save_checkpoint(path, snapshot)


def _meta_loop(
    run: MetaRun,
    state: RunState,
    last: dict,
    logger: Any,
    out_dir: Path,
    save: Callable[[dict], None],
    writer: bool,
    start: int,
    online: OnlineState | None,
) -> None:
    """Drive the outer-step generator: snapshot, log, draw the learned loss, checkpoint.
    ``last["state"]`` always holds the state after the last *completed* outer step."""
    mc, task = run.cfg.meta, run.task
    if run.select_pool is not None and start == 0:  # φ₀ is a candidate too
        state.snapshots[0] = {k: v.detach().clone() for k, v in run.learner.params.items()}
    bar = tqdm(
        _outer_steps(run, online, start),
        total=mc.steps - start,
        desc=f"meta {run.loss_name}",
        disable=not (run.cfg.progress and writer),
        mininterval=1.0,
    )
    every = int(mc.selection.every)
    for step, metrics in bar:
        if run.select_pool is not None and (step % every == 0 or step == mc.steps):
            state.snapshots[step] = {k: v.detach().clone() for k, v in run.learner.params.items()}
        last["state"] = state.capture(step)
        if metrics:
            logger.log(metrics, step=step)
            for key, (columns, rows) in getattr(run.learner, "tables", dict)().items():
                logger.table(key, columns, rows)  # e.g. the GP's best trees per generation
            objective = metrics["meta/val_objective"]
            last.setdefault("objectives", []).append(objective)  # for check_progress
            last.setdefault("fitness", {})[step] = objective  # for selection.json
            bar.set_postfix(obj=f"{objective:.4g}", refresh=False)
        if writer and (step % mc.plot_every == 0 or step == mc.steps):
            png = plot_losses(
                {"learned": run.loss, **run.baselines},
                task.kind,
                out_dir / "learned_loss.png",
                num_classes=task.num_classes,
                class_counts=task.class_counts,
                title=f"{run.loss_name} after {step} steps",
            )
            logger.image("meta/learned_loss", png, step=step)
        if step % mc.checkpoint_every == 0 or checkpoint_requested():
            save(last["state"])


def _report_stop(
    e: BaseException, run: MetaRun, done: int, out_dir: Path, meta_info: dict, logger: Any
) -> None:
    """Say where a stopped run left its work; a diverged one also keeps its last good φ."""
    if isinstance(e, NonFiniteMetaGradient):
        stopped = f"diverged ({e.cause})"
        lr = _learned_lr(run)  # the last good φ's own inner lr, too (if it is a usable one)
        if lr is not None and math.isfinite(lr) and lr > 0:
            meta_info = dict(meta_info, inner_lr=lr)
        good = save_learned_loss(
            run.loss,
            out_dir / "learned_loss_last_good.pt",
            steps=done,
            complete=False,
            stopped=stopped,
            **meta_info,
        )
        log.error(
            "meta-training diverged after outer step %d: %s The last good φ is in %s "
            "(loadable like learned_loss.pt)",
            done,
            e,
            good,
        )
        logger.learned_loss(good, dict(meta_info, steps=done, complete=False, stopped=stopped))
    log.error(
        "meta-training stopped after outer step %d; checkpoint saved to %s (resume with "
        "meta.resume_from=%s)",
        done,
        out_dir / "checkpoint.pt",
        out_dir,
    )


def _select(run: MetaRun, state: RunState, last: dict, out_dir: Path, logger: Any) -> dict:
    """``meta.selection.frac > 0``: score every kept φ on the held-out selection split and
    make the best the learned loss (:mod:`metaloss.selection`); selection.json records each
    one's fitness beside its selection score. Nothing to do otherwise."""
    if run.select_pool is None:
        return {}
    sel = run.cfg.meta.selection
    fitness = getattr(run.learner, "fitness_problem", lambda p: p)(run.problem)
    scores = selection.score(
        fitness,
        state.snapshots,
        run.select_pool,
        run.factory,
        seeds=int(sel.seeds),
        inner_steps=int(run.cfg.meta.inner_steps),
        inner_batch=run.cfg.meta.inner_batch,
    )
    best = selection.choose(scores, float(sel.margin))
    if best is not None:
        with torch.no_grad():
            for k, p in run.learner.params.items():
                p.copy_(state.snapshots[best][k])
    seen = last.get("fitness", {})
    record = {
        "frac": float(sel.frac),
        "seeds": int(sel.seeds),
        "margin": float(sel.margin),
        "chosen_step": best,
        "candidates": [
            {"step": s, "logged_objective": seen.get(s), "selection": v} for s, v in scores.items()
        ],
    }
    write_json(out_dir / "selection.json", record)
    log.info(
        "selection: φ of outer step %s chosen on the held-out split (%s); logged objective %s",
        best,
        ", ".join(f"step {s}: {v:.4g}" for s, v in scores.items()),
        ", ".join(f"step {s}: {seen[s]:.4g}" for s in scores if s in seen),
    )
    if best == 0 and any(math.isfinite(v) and v < scores[0] for v in scores.values()):
        log.info(
            "selection: φ₀ kept: no φ scored lower than its %.4g by more than meta.selection.margin"
            " = %g",
            scores[0],
            float(sel.margin),
        )
    logger.summary({"selection/chosen_step": best})
    return {"selection": record}


def _check_progress(run: MetaRun, last: dict) -> str | None:
    """A warning naming the likely cause when the objective never moved."""
    return check_progress(
        last.get("objectives", []),
        run.problem,
        run.learner.params,
        lambda: run.sample_batch(torch.Generator().manual_seed(run.cfg.seed), 1),
        num_classes=run.task.num_classes,
        outer=run.learner.outer,
        initial=getattr(run.learner, "initial", None),
    )


def _learned_lr(run: MetaRun) -> float | None:
    """The inner lr meta-learned with φ (``meta.learn_inner_lr``), else None."""
    log_lr = getattr(run.learner, "log_lr", None)
    return None if log_lr is None else float(log_lr.detach().exp())


def _save_and_test(
    run: MetaRun, out_dir: Path, meta_info: dict, logger: Any, notes: list, steps: int
) -> dict:
    """Save the learned loss (``steps``: the outer steps its φ had; fewer than meta.steps
    when held-out selection kept an earlier φ), then meta-test it when ``meta_test.enabled``."""
    cfg, mc = run.cfg, run.cfg.meta
    learned_lr = _learned_lr(run)  # saved with φ, and tested with
    if learned_lr is not None:
        meta_info = dict(meta_info, inner_lr=learned_lr)
    learned_path = save_learned_loss(
        run.loss, out_dir / "learned_loss.pt", steps=steps, complete=True, **meta_info
    )
    log.info("learned loss saved to %s (metaloss-eval loss_path=%s)", learned_path, learned_path)
    logger.learned_loss(learned_path, dict(meta_info, steps=steps, complete=True))
    result = {
        "learned_loss": str(learned_path),
        "skipped_steps": run.learner.skipped,
        "warnings": [n for n in notes if n],
    }
    if cfg.meta_test.enabled:
        frozen = run.loss.requires_grad_(False)
        cost = learned_loss_cost(cfg, sum(p.numel() for p in run.loss.parameters()))
        # the horizon φ was trained for: K inner steps offline, the whole run online
        horizon = int(mc.inner_steps) if mc.mode == "offline" else int(mc.steps)
        result.update(
            run_meta_test(
                cfg,
                frozen,
                run.pool,
                run.inner_opt,
                out_dir,
                logger,
                meta_training_steps=cost,
                meta_horizon=horizon,
                learned_lr=learned_lr,
            )  # fmt: skip
        )
    return result


def _app(cfg: DictConfig, hc: HydraConf) -> float | None:
    out = run(cfg, output_dir(hc), hc.runtime.choices.get("loss"))
    return (out.get("significance") or {}).get("learned_mean")


main = hydra_command("meta", _app)

if __name__ == "__main__":
    main()

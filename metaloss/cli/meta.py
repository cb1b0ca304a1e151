"""`metaloss-meta`: meta-train a parametric loss, then meta-test it against the baselines.

metaloss-meta                                    # the quickstart experiment (make run)
metaloss-meta experiment=ml3_sine
metaloss-meta task=mnist1d model=mlp loss=taylorglo hypergrad=unrolled optim=sgd
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from metaloss import distributed, runtime
from metaloss.cli.comparison import check_tuned, run_meta_test, tasks_for_seed_fn
from metaloss.cli.logger import NullLogger, open_logger
from metaloss.cli.signals import (
    checkpoint_requested,
    console,
    critical,
    exit_on_interrupt,
    interruptible,
)
from metaloss.cmaes import CMAES
from metaloss.config import (
    DEFAULT_OBJECTIVE,
    baselines_for,
    check_loss,
    conf_dir,
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
from metaloss.plots import plot_losses
from metaloss.runs import (
    VOLATILE,
    ResumeMismatch,
    RunDir,
    atomic_write,
    describe,
    differences,
    fingerprint,
    hydra_record,
    identity,
    split_applied,
    stored_archive_problem,
)
from metaloss.sampling import sample_meta_batch
from metaloss.train import build_model
from metaloss.tune import learned_loss_cost
from metaloss.validate import ConfigError, check_against_task, check_config

log = logging.getLogger("metaloss")
CKPT_FORMAT = "metaloss.checkpoint/2"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run's loss."""


def task_pool(cfg: DictConfig) -> list:
    with runtime.canonical_draws():  # the same tasks in a float32 and a float64 run
        first = instantiate(cfg.task)
        if not first.distribution:
            return [first]
        base = int(cfg.task.seed)
        return [first] + [
            instantiate(cfg.task, seed=base + i) for i in range(1, int(cfg.meta.train_tasks))
        ]


def _load_checkpoint(path: Path) -> dict:
    problem = stored_archive_problem(path)
    if problem:
        raise CorruptCheckpoint(
            f"{path} is not a checkpoint metaloss wrote: {problem}; delete it or set "
            "meta.resume_from to another one"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpoint(
            f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it or "
            "set meta.resume_from to another one"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CorruptCheckpoint(
            f"{path} is not a metaloss checkpoint of format {CKPT_FORMAT} (older "
            "checkpoints carry no fingerprint, so they cannot prove which run they belong to)"
        )
    return ckpt


class RunState:
    """Everything that evolves during meta-training — φ and the meta-optimizer, the sampling
    RNG, torch's global RNG, the hypergradient method's own state (ES noise counter) and,
    online, the base model — captured together at step boundaries."""

    def __init__(
        self,
        learner: MetaLearner | CMAES,
        gen: torch.Generator,
        hypergrad,
        online: OnlineState | None,
        ident: dict,
    ) -> None:
        self.learner, self.gen, self.hypergrad, self.online, self.ident = (
            learner,
            gen,
            hypergrad,
            online,
            ident,
        )
        self.fingerprint = fingerprint(ident)  # once: capture() runs after every step

    def capture(self, step: int) -> dict:
        return {
            "format": CKPT_FORMAT,
            "step": step,
            "fingerprint": self.fingerprint,
            "identity": self.ident,
            "learner": self.learner.state_dict(),
            "rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "hypergrad": self.hypergrad.state_dict()
            if hasattr(self.hypergrad, "state_dict")
            else None,
            "online": None if self.online is None else self.online.state_dict(),
        }

    def restore(self, ckpt: dict) -> None:
        self.learner.load_state_dict(ckpt["learner"])
        self.gen.set_state(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if hasattr(self.hypergrad, "load_state_dict") and ckpt.get("hypergrad") is not None:
            self.hypergrad.load_state_dict(ckpt["hypergrad"])
        if self.online is not None:
            self.online.load_state_dict(ckpt["online"])


def _resume(cfg: DictConfig, out_dir: Path, state: RunState, make_meta_optimizer) -> int:
    """Continue from ``meta.resume_from`` (a checkpoint or its run dir) or from this run
    directory's own checkpoint; return the completed outer steps (0: fresh).

    The checkpoint must have been made by a run with the same identity (config minus the
    keys that may change on resume). An explicit ``meta.resume_from`` may change the meta
    optimizer's hyper-parameters, clipping and the NaN patience: those are applied from the
    resumed step on, and logged. Any other difference is refused, naming the keys."""
    explicit = cfg.meta.resume_from is not None
    own = out_dir / "checkpoint.pt"
    resume = Path(cfg.meta.resume_from).expanduser() if explicit else own
    if resume.is_dir():
        resume = resume / "checkpoint.pt"
    if explicit and not resume.is_file():
        raise FileNotFoundError(f"meta.resume_from: no checkpoint at {resume}")
    if explicit and own.is_file() and own.resolve() != resume.resolve():
        # the same command again: this run was started from resume_from before and has
        # progressed since; its own checkpoint (same identity, checked below) continues it
        log.info(
            "%s has its own checkpoint: continuing it rather than starting again from %s",
            out_dir,
            resume,
        )
        resume = own
    if not resume.is_file():
        return 0
    ckpt = _load_checkpoint(resume)
    diff = differences(ckpt.get("identity") or {}, state.ident)
    applied, refused = split_applied(diff)
    if refused or (applied and not explicit):
        raise ResumeMismatch(
            f"checkpoint {resume} was made by a run with another configuration: {describe(refused or applied)}. "
            + (
                "Nothing was run. Resume with the settings it was made with, or start a fresh run."
                if refused
                else "To continue it with these new settings, pass meta.resume_from=" + str(out_dir)
            )
        )
    step = int(ckpt["step"])
    if step > cfg.meta.steps:
        raise ResumeMismatch(
            f"checkpoint {resume} is at outer step {step}, past meta.steps={cfg.meta.steps}: "
            f"set meta.steps >= {step} to continue it"
        )
    try:
        state.restore(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CorruptCheckpoint(f"{resume} does not match this loss/optimizer: {e}") from e
    changed = state.learner.apply_hyperparameters(make_meta_optimizer)
    if applied:
        log.warning(
            "resuming with changed settings, applied from outer step %d on: %s",
            step,
            describe(applied),
        )
    elif changed:  # identity matched, so this can only be a default changed in the code
        log.warning("meta-optimizer hyper-parameters applied on resume: %s", changed)
    log.info("resumed from %s at outer step %d", resume, step)
    return step


def _meta_loop(
    bar,
    state: RunState,
    last: dict,
    logger,
    loss,
    baselines,
    task,
    loss_name,
    out_dir,
    mc,
    save_checkpoint,
    writer: bool = True,
) -> None:
    """Drive the outer-step generator: snapshot, log, draw the learned loss, checkpoint.
    ``last["state"]`` always holds the state after the last *completed* outer step."""
    for step, metrics in bar:
        last["state"] = state.capture(step)
        if metrics:
            logger.log(metrics, step=step)
            last.setdefault("objectives", []).append(
                metrics["meta/val_objective"]
            )  # for check_progress
            bar.set_postfix(obj=f"{metrics['meta/val_objective']:.4g}", refresh=False)
        if writer and (step % mc.plot_every == 0 or step == mc.steps):
            png = plot_losses(
                {"learned": loss, **baselines},
                task.kind,
                out_dir / "learned_loss.png",
                num_classes=task.num_classes,
                class_counts=task.class_counts,
                title=f"{loss_name} after {step} steps",
            )
            logger.image("meta/learned_loss", png, step=step)
        if step % mc.checkpoint_every == 0 or checkpoint_requested():
            save_checkpoint(last["state"])


def run(cfg: DictConfig, out_dir: Path, loss_name: str | None = None) -> dict:
    """The app body: settings checked, run directory claimed, then meta-training and the
    meta-test. Callable without Hydra's launcher (tests compose a config and call it)."""
    check_config(cfg)
    device, dtype = runtime.setup(cfg)
    out_dir = Path(out_dir)
    # Online, the step budget shapes the run itself (the loss sees progress t = step/steps),
    # so it is part of the identity; offline, more steps only continue the same trajectory.
    ident = identity(
        cfg, ignore=[k for k in VOLATILE if not (k == "meta.steps" and cfg.meta.mode == "online")]
    )
    explicit = Path(cfg.meta.resume_from).expanduser() if cfg.meta.resume_from is not None else None
    same_dir = (
        explicit is not None
        and (explicit if explicit.is_dir() else explicit.parent).resolve() == out_dir.resolve()
    )
    # Resuming into its own directory with a new meta learning rate is allowed; any other
    # change means the directory belongs to another run.
    allow = (lambda diff: not split_applied(diff)[1]) if same_dir else None
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
            f"meta.tasks_per_step = {cfg.meta.tasks_per_step}: must be >= the number of processes "
            f"({world.size}), each of which runs a share of the tasks"
        )
    try:
        # only rank 0 owns the directory, logs and writes; the others compute their share
        with (
            (
                RunDir(out_dir, "meta", ident, allow=allow) if world.is_writer else _Reader(out_dir)
            ) as run_dir,
            interruptible(),
        ):
            return _run(cfg, run_dir, loss_name, ident, device, dtype, world)
    finally:
        distributed.finish()


class _Reader:
    """A non-zero rank's view of the run directory: it may read the checkpoint, never write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, hydra_files=None) -> None:
        pass

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _run(
    cfg: DictConfig,
    run_dir: RunDir | _Reader,
    loss_name: str | None,
    ident: dict,
    device: torch.device,
    dtype: torch.dtype,
    world: distributed.World,
) -> dict:
    out_dir = run_dir.path
    writer = world.is_writer
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # sampling RNG: CPU, the same on every device
    pool = [t.to(device, dtype) for t in task_pool(cfg)]
    task = pool[0]
    check_against_task(cfg, task)
    with runtime.canonical_draws():  # a random initial φ (ML3) is the same in either dtype
        loss = instantiate_loss(cfg.loss, task)
    if isinstance(loss, torch.nn.Module):
        loss = loss.to(device=device, dtype=dtype)
    if cfg.loss.get("_target_", "").endswith("load_learned_loss") and cfg.loss.get("frozen", True):
        raise ConfigError(
            "loss = learned with loss.frozen = true cannot be meta-trained; set loss.frozen=false "
            "to continue meta-training a saved loss (or use metaloss-eval to test it)"
        )
    if not isinstance(loss, ParametricLoss):
        raise ConfigError(
            f"metaloss-meta needs a parametric loss, got {loss_name!r}; choose one of "
            f"{', '.join(parametric_losses(cfg))} "
            "(fixed losses go in `compare:`)"
        )
    check_loss(
        loss, task, loss_name, cfg
    )  # kind, trained task (a saved loss), one value per example
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
    learner: MetaLearner | CMAES
    if (
        getattr(make_meta_optimizer, "func", None) is CMAES
    ):  # derivative-free: replaces the gradient learner
        learner = CMAES.for_run(make_meta_optimizer, loss, cfg, task.kind, world.size)
    else:
        learner = MetaLearner(
            loss,
            make_meta_optimizer,
            learn_inner_lr=cfg.meta.learn_inner_lr,
            inner_lr=inner_opt.hparams["lr"],
            clip_grad_norm=cfg.meta.clip_grad_norm,
            max_bad_steps=cfg.meta.max_bad_steps,
        )
    baselines = baselines_for(cfg.compare, task, cfg)
    if (
        cfg.meta_test.enabled
    ):  # fail now, not after meta-training, if the test tasks cannot be built
        tasks_for_seed_fn(cfg, pool)(0)
        check_tuned(
            cfg, pool, inner_opt
        )  # a tuned.json for another setup: refused before meta-training
    mc = cfg.meta
    online = (
        OnlineState.fresh(problem, task, factory, mc.inner_batch, gen)
        if mc.mode == "online"
        else None
    )
    state = RunState(learner, gen, hypergrad, online, ident)
    start = _resume(cfg, out_dir, state, make_meta_optimizer)
    run_dir.record(hydra_record(cfg))
    ckpt_path = out_dir / "checkpoint.pt"

    def save_checkpoint(snapshot: dict) -> None:
        if not writer:
            return
        with critical():
            atomic_write(ckpt_path, lambda tmp: torch.save(snapshot, tmp))

    if mc.mode == "offline":

        def sample():
            return sample_meta_batch(
                pool,
                factory,
                n_tasks=mc.tasks_per_step,
                inner_steps=mc.inner_steps,
                inner_batch=mc.inner_batch,
                val_batch=mc.val_batch,
                gen=gen,
                val_from_train=mc.val_from_train,
            )

        steps = offline_steps(learner, problem, hypergrad, sample, steps=mc.steps, start=start)
    else:
        steps = online_steps(
            learner,
            problem,
            hypergrad,
            task,
            online,
            steps=mc.steps,
            update_every=mc.online_update_every,
            val_batch=mc.val_batch,
            gen=gen,
            start=start,
        )

    log.info(
        "meta-training %s on %s | %s, %s, K=%d, T=%d, %d steps | %s, %s, %d thread(s)",
        loss_name,
        task.describe(),
        "CMA-ES" if isinstance(learner, CMAES) else type(hypergrad).__name__,
        inner_opt.name,
        mc.inner_steps,
        mc.tasks_per_step,
        mc.steps,
        device,
        str(dtype).replace("torch.", ""),
        torch.get_num_threads(),
    )
    meta_info = {
        "task": task.name,
        "loss_name": loss_name,
        "fingerprint": fingerprint(ident),
        "setup": training_setup(cfg),
    }  # metaloss-eval takes task/model/optim from it
    logging_cm = (
        open_logger(cfg, out_dir, job_type="meta", name=f"{loss_name}-{task.name}-s{cfg.seed}")
        if writer
        else nullcontext(NullLogger())
    )
    with logging_cm as logger:
        bar = tqdm(
            steps,
            total=mc.steps - start,
            desc=f"meta {loss_name}",
            disable=not (cfg.progress and writer),
            mininterval=1.0,
        )
        last = {"state": state.capture(start)}
        t0 = time.perf_counter()
        try:
            _meta_loop(
                bar,
                state,
                last,
                logger,
                loss,
                baselines,
                task,
                loss_name,
                out_dir,
                mc,
                save_checkpoint,
                writer,
            )
            notes = [learner.finish()]  # no step ever finite: NonFiniteMetaGradient, never complete
        except BaseException as e:  # a NaN streak, Ctrl-C, SIGTERM, ...: keep the work done so far
            save_checkpoint(last["state"])
            done = last["state"]["step"]
            if not writer:
                raise
            if isinstance(e, NonFiniteMetaGradient):
                good = save_learned_loss(
                    loss,
                    out_dir / "learned_loss_last_good.pt",
                    steps=done,
                    complete=False,
                    stopped=f"diverged ({e.cause})",
                    **meta_info,
                )
                log.error(
                    "meta-training diverged after outer step %d: %s The last good φ is in %s "
                    "(loadable like learned_loss.pt)",
                    done,
                    e,
                    good,
                )
                logger.learned_loss(
                    good,
                    dict(meta_info, steps=done, complete=False, stopped=f"diverged ({e.cause})"),
                )
            log.error(
                "meta-training stopped after outer step %d; checkpoint saved to %s (resume with "
                "meta.resume_from=%s)",
                done,
                ckpt_path,
                out_dir,
            )
            raise
        save_checkpoint(last["state"])
        elapsed = time.perf_counter() - t0
        log.info(
            "meta-training: %d outer steps in %.2f s (%.4f s/step)",
            mc.steps - start,
            elapsed,
            elapsed / max(1, mc.steps - start),
        )
        if not writer:
            return {"rank": world.rank, "skipped_steps": learner.skipped}
        notes.append(
            check_progress(  # an objective that never moved: a warning naming the likely cause
                last.get("objectives", []),
                problem,
                learner.params,
                lambda: sample_meta_batch(
                    pool,
                    factory,
                    n_tasks=1,
                    inner_steps=mc.inner_steps,
                    inner_batch=mc.inner_batch,
                    val_batch=mc.val_batch,
                    gen=torch.Generator().manual_seed(cfg.seed),
                    val_from_train=mc.val_from_train,
                ),
                num_classes=task.num_classes,
                outer="cmaes" if isinstance(learner, CMAES) else "gradient",
                initial=getattr(learner, "initial", None),
            )
        )
        learned_path = save_learned_loss(
            loss, out_dir / "learned_loss.pt", steps=mc.steps, complete=True, **meta_info
        )
        log.info(
            "learned loss saved to %s (metaloss-eval loss_path=%s)", learned_path, learned_path
        )
        logger.learned_loss(learned_path, dict(meta_info, steps=mc.steps, complete=True))
        result = {
            "learned_loss": str(learned_path),
            "skipped_steps": learner.skipped,
            "warnings": [n for n in notes if n],
        }
        if cfg.meta_test.enabled:
            frozen = loss.requires_grad_(False)
            cost = learned_loss_cost(cfg, sum(p.numel() for p in loss.parameters()))
            horizon = (
                int(mc.inner_steps) if mc.mode == "offline" else int(mc.steps)
            )  # online: the whole run
            result.update(
                run_meta_test(
                    cfg,
                    frozen,
                    pool,
                    inner_opt,
                    out_dir,
                    logger,
                    meta_training_steps=cost,
                    meta_horizon=horizon,
                )
            )
    return result


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="meta")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    with exit_on_interrupt():
        out = run(cfg, Path(hc.runtime.output_dir), hc.runtime.choices.get("loss"))
    sig = out.get("significance") or {}
    return sig.get("learned_mean")


def main() -> None:
    """The console script (SIGTERM forwarded to parallel jobs, exit 128 + signal)."""
    console(_hydra_main)


if __name__ == "__main__":
    main()

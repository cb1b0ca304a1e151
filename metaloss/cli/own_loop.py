"""``metaloss-train`` and ``metaloss-meta`` on tasks that train with a loop of their own
(:attr:`metaloss.kinds.TaskKind.own_loop`: GANs, :mod:`metaloss.gan`; policy gradients,
:mod:`metaloss.rl`), chosen from config alone:

    metaloss-train task=gan_ring loss=gan_hinge optim.lr=0.002 seeds=3
    metaloss-meta task=cartpole loss=learned_policy optim=adam meta_optim=cmaes meta.steps=10

Such a task holds its training budget (``task.*``) and builds its own optimizers (Adam), so of
the run's settings it reads ``optim.lr`` (``optim`` must be ``adam``), the seeds, the loss, and
for ``metaloss-meta`` the CMA-ES settings (``meta.steps`` generations, ``meta.tasks_per_step``
training seeds per candidate, ``meta_optim.sigma0`` / ``popsize``) and ``meta_test.seeds`` /
``compare``. Settings it would not read (``model``, ``train.*``, the gradient meta-learner's)
are refused when given on the command line, rather than silently ignored. The meta-test trains
every loss at ``optim.lr`` on seeds 0..n-1 (seed i: the same initialisation and draws for every
loss) and decides with the project's paired test (:func:`metaloss.metatest.significance`); the
recorded comparisons with tuned learning rates are ``scripts/gan_record.py`` and
``scripts/rl_record.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metaloss import kinds
from metaloss.cli.comparison import write_comparison
from metaloss.cli.logger import open_logger, write_json
from metaloss.config import DEFAULT_LOSS, baselines_for, check_loss, instantiate_loss, loss_option
from metaloss.errors import ConfigError
from metaloss.losses.base import ParametricLoss
from metaloss.losses.io import save_learned_loss
from metaloss.metatest import significance
from metaloss.runs import RunDir, hydra_record
from metaloss.train import NonFiniteLoss

log = logging.getLogger("metaloss")

# command-line settings a task with a loop of its own never reads, per app (prefixes)
UNREAD = {
    "train": ("model", "train.", "budget", "budget_lr", "device", "dtype"),
    "meta": (
        "model",
        "device",
        "dtype",
        "hypergrad",
        "meta.inner_steps",
        "meta.inner_batch",
        "meta.val_batch",
        "meta.objective",
        "meta.mode",
        "meta.resume_from",
        "meta.learn_inner_lr",
        "meta.selection",
        "meta_test.steps",
        "meta_test.batch_size",
        "meta_test.lr",
        "meta_test.tuned",
        "meta_test.tune_learned_lr",
        "meta_test.tasks_per_seed",
        "meta_test.task_overrides",
        "meta_test.vectorise",
    ),
}


def is_own_loop(task_cfg: Any) -> bool:
    """Whether a task config's ``_target_`` builds a task that trains with a loop of its own."""
    from hydra.utils import get_object

    try:
        target = get_object(str(task_cfg.get("_target_")))
    except Exception:  # noqa: BLE001 - not ours to diagnose: the usual path reports it
        return False
    kind = getattr(target, "kind", None)
    return isinstance(kind, str) and kind in kinds.KINDS and kinds.get(kind).own_loop


def _sized(task: Any) -> Any:
    """The task, or under ``debug=...`` its version that runs in seconds (the debug configs
    shorten the engine's settings, which such a task does not read)."""
    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("debug"):
        task = task.debug_sized()
        log.info("debug: %s", task.describe())
    return task


def _check_settings(cfg: DictConfig, task: Any, app: str) -> float:
    """The settings the task does not read, refused; the learning rate it does."""
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    unread = [o for o in given if o.lstrip("+~").startswith(UNREAD[app])]
    if unread:
        raise ConfigError(
            f"task {task.name} ({task.kind}) trains with a loop of its own and does not read "
            f"{', '.join(unread)}; its budget is task.* ({task.describe()}), its optimizer "
            "Adam at optim.lr (metaloss.cli.own_loop)"
        )
    target = str(cfg.optim.get("_target_", ""))
    if not target.endswith(".adam"):
        raise ConfigError(
            f"optim = {target}: task {task.name} trains with Adam optimizers of its own; use "
            "optim=adam (its lr is the one read)"
        )
    lr = cfg.optim.lr
    if not (isinstance(lr, float | int) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optim.lr = {lr!r}: must be a finite number > 0")
    return float(lr)


def train(cfg: DictConfig, run_dir: RunDir, task: Any, loss_name: str | None) -> float:
    """metaloss-train: seeds ``seed .. seed+seeds-1``, one metrics.json (one entry per seed
    when ``seeds`` > 1); a diverged seed is written as NaN, then the run stops with an error."""
    lr = _check_settings(cfg, task, "train")
    task = _sized(task)
    if cfg.get("loss") is None:
        loss_name = DEFAULT_LOSS[task.kind]
        loss = loss_option(loss_name, task, cfg)
    else:
        loss = instantiate_loss(cfg.loss, task)
        check_loss(loss, task, loss_name, cfg)
    metric = cfg.metric or task.primary_metric
    if metric not in _metric_names(task):
        raise ConfigError(f"metric = {metric!r}: one of {', '.join(_metric_names(task))}")
    seeds = [int(cfg.seed) + i for i in range(int(cfg.seeds))]
    run_dir.record(hydra_record(cfg))
    log.info("task %s | loss %s | lr %g | seeds %s", task.describe(), loss_name, lr, seeds)
    runs = []
    with open_logger(cfg, run_dir.path, job_type="train", name=f"{loss_name}-s{seeds[0]}") as lg:
        for s in seeds:
            m = task.train(loss, lr=lr, seed=s)
            runs.append({"seed": s, "metrics": m})
            lg.summary({f"seed{s}/{k}": v for k, v in m.items()} if len(seeds) > 1 else m)
            log.info("seed %d: %s", s, "  ".join(f"{k}={v:.4f}" for k, v in sorted(m.items())))
    record = {"loss": loss_name, "task": task.name, "seed": seeds[0], "metric": metric}
    if len(seeds) == 1:
        record["metrics"] = runs[0]["metrics"]
    else:
        record.update(seeds=seeds, runs=runs)
    write_json(run_dir.path / "metrics.json", record)
    diverged = [r["seed"] for r in runs if not math.isfinite(r["metrics"][metric])]
    if diverged:
        raise NonFiniteLoss(
            f"training diverged (NaN/inf) for seed(s) {diverged}; their metrics are NaN in "
            f"{run_dir.path / 'metrics.json'}"
        )
    return float(sum(r["metrics"][metric] for r in runs) / len(runs))


def _metric_names(task: Any) -> list[str]:
    return [f"{split}/{m}" for split in ("test", "val") for m in kinds.get(task.kind).metrics]


def meta(cfg: DictConfig, run_dir: RunDir, task: Any, loss_name: str | None) -> dict:
    """metaloss-meta: CMA-ES over the learned loss (``learned_loss.pt``, ``search.json``), then
    the meta-test against ``compare`` (``comparison.json`` / ``.md`` / ``.png``). A stopped run
    keeps nothing of its search (no checkpoint: rerun it)."""
    lr = _check_settings(cfg, task, "meta")
    task = _sized(task)
    if not str(cfg.meta_optim.get("_target_", "")).endswith("cmaes.CMAES"):
        raise ConfigError(
            f"meta_optim = {cfg.meta_optim.get('_target_')}: task {task.name} trains with a loop "
            "of its own, which no hypergradient goes through; its loss is searched by CMA-ES "
            "(meta_optim=cmaes)"
        )
    if cfg.meta_optim.get("objective") is not None:
        raise ConfigError(
            f"meta_optim.objective = {cfg.meta_optim.objective!r}: task {task.name}'s search "
            f"scores candidates on its own validation measure ({task.primary_metric} on "
            "validation draws); leave it null"
        )
    loss = instantiate_loss(cfg.loss, task)
    if not isinstance(loss, ParametricLoss):
        raise ConfigError(
            f"metaloss-meta needs a parametric loss, got {loss_name!r}; for {task.kind} tasks "
            f"one of: learned_{'gan' if task.kind == 'gan' else 'policy'} (fixed losses go in "
            "`compare:`)"
        )
    check_loss(loss, task, loss_name, cfg)
    test = bool(cfg.meta_test.enabled)
    baselines = baselines_for(cfg.compare, task, cfg) if test else {}  # unknown names: now
    run_dir.record(hydra_record(cfg))
    generations, per_candidate = int(cfg.meta.steps), int(cfg.meta.tasks_per_step)
    log.info(
        "searching %s on %s | CMA-ES, %d generations, %d seed(s) per candidate, lr %g",
        loss_name,
        task.describe(),
        generations,
        per_candidate,
        lr,
    )
    with open_logger(cfg, run_dir.path, job_type="meta", name=f"{loss_name}-s{cfg.seed}") as lg:

        def progress(row: dict) -> None:
            lg.log(
                {f"meta/{k}": v for k, v in row.items() if k != "generation"},
                step=row["generation"],
            )
            log.info("generation %d/%d: %s", row["generation"], generations, _show(row))

        history = task.search(
            loss,
            lr=lr,
            generations=generations,
            seeds=per_candidate,
            sigma0=float(cfg.meta_optim.sigma0),
            popsize=cfg.meta_optim.popsize,
            seed=int(cfg.seed),
            progress=progress,
        )
        write_json(run_dir.path / "search.json", {"task": task.name, "history": history})
        path = save_learned_loss(
            loss,
            run_dir.path / "learned_loss.pt",
            task=task.name,
            loss_name=loss_name,
            steps=generations,
            complete=True,
        )
        log.info("learned loss: %s", path)
        out: dict = {"learned_loss": str(path), "history": history}
        if not test:
            return out
        losses = {"learned": loss, **baselines}
        seeds = list(range(int(cfg.meta_test.seeds)))
        metric = cfg.meta_test.metric or task.primary_metric
        results: dict[str, dict[str, list[float]]] = {}
        for name, candidate in losses.items():
            runs = [task.train(candidate, lr=lr, seed=s) for s in seeds]
            results[name] = {k: [r[k] for r in runs] for k in runs[0]}
            log.info(
                "meta-test %s: %s",
                name,
                _show({k: sum(v) / len(v) for k, v in results[name].items()}),
            )
        sig = significance(results, metric, alpha=float(cfg.meta_test.alpha))
        record = {
            "task": task.name,
            "metric": metric,
            "seeds": seeds,
            "lr": lr,
            "lr_note": "every loss at optim.lr (untuned); the tuned comparisons: "
            "scripts/gan_record.py, scripts/rl_record.py",
            "results": results,
            "significance": sig,
        }
        write_comparison(record, losses, task, run_dir.path, lg)
    return {**out, "significance": sig}


def _show(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())

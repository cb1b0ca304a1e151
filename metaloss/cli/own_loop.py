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
from metaloss.config import (
    DEFAULT_LOSS,
    baselines_for,
    check_loss,
    instantiate_loss,
    loss_option,
    training_setup,
)
from metaloss.errors import ConfigError
from metaloss.losses.base import ParametricLoss
from metaloss.losses.io import save_learned_loss
from metaloss.metatest import significance
from metaloss.metrics import metric_names
from metaloss.runs import RunDir, hydra_record
from metaloss.train import NonFiniteLoss

log = logging.getLogger("metaloss")

# The command-line settings a task with a loop of its own reads, per app: any other (model,
# train.*, device, the gradient meta-learner's, checkpoints, ...) is refused, not ignored.
# An entry ending in "." stands for its keys; one without, for the setting itself.
READ = {
    "train": ("task", "task.", "loss", "loss.", "optim", "optim.lr", "seed", "seeds", "metric"),
    "meta": (
        "task",
        "task.",
        "loss",
        "loss.",
        "optim",
        "optim.lr",
        "seed",
        "meta_optim",
        "meta_optim.sigma0",
        "meta_optim.popsize",
        "meta.steps",
        "meta.tasks_per_step",
        "compare",
        "meta_test.enabled",
        "meta_test.seeds",
        "meta_test.metric",
        "meta_test.alpha",
    ),
}
EVERY_APP = ("logger", "logger.", "progress", "threads", "trusted_modules", "debug", "experiment")


def _read(override: str, app: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key.startswith(r) if r.endswith(".") else key == r for r in (*READ[app], *EVERY_APP))


def is_own_loop(task_cfg: Any) -> bool:
    """Whether a task config's ``_target_`` builds a task that trains with a loop of its own."""
    from hydra.utils import get_object

    if not hasattr(task_cfg, "get"):
        return False
    try:
        target = get_object(str(task_cfg.get("_target_")))
    except Exception:  # noqa: BLE001 - not ours to diagnose: the usual path reports it
        return False
    kind = getattr(target, "kind", None)
    return isinstance(kind, str) and kind in kinds.KINDS and kinds.get(kind).own_loop


def _given() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def refuse_in(app: str, task_cfg: Any, loss: Any = None) -> None:
    """metaloss-tune and metaloss-eval run the engine's loop: refuse a task with a loop of its
    own (or a learned loss made for one) before anything is computed, saying what does it."""
    kinds_of = getattr(loss, "kinds", ()) if loss is not None else ()
    if not (
        is_own_loop(task_cfg) or any(k in kinds.KINDS and kinds.get(k).own_loop for k in kinds_of)
    ):
        return
    what = {
        "tune": "its losses' learning rates are tuned by scripts/gan_record.py and "
        "scripts/rl_record.py (Optuna, the same budget for every loss)",
        "eval": "test a learned loss with metaloss-train task=<its task> loss=learned "
        "loss.path=<learned_loss.pt> seeds=<n>",
    }[app]
    raise ConfigError(
        f"metaloss-{app} runs the engine's training loop; GAN and policy-gradient tasks train "
        f"with loops of their own: {what}"
    )


def _sized(cfg: DictConfig, task: Any) -> Any:
    """The task, or under ``debug=...`` its version that runs in seconds (the debug configs
    shorten the engine's settings, which such a task does not read); a ``task.<key>`` given on
    the command line still wins, as it does over the debug config for any other task."""
    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("debug"):
        keys = [o.lstrip("+").split("=", 1)[0] for o in _given()]
        keep = {k[5:]: cfg.task[k[5:]] for k in keys if k.startswith("task.") and "." not in k[5:]}
        task = task.debug_sized(**keep)
        log.info("debug: %s", task.describe())
    return task


def _check_settings(cfg: DictConfig, task: Any, app: str) -> float:
    """The settings the task does not read, refused; the learning rate it does."""
    unread = [o for o in _given() if not _read(o, app)]
    if unread:
        read = ", ".join(r + ("*" if r.endswith(".") else "") for r in READ[app])
        raise ConfigError(
            f"task {task.name} ({task.kind}) trains with a loop of its own and does not read "
            f"{', '.join(unread)}; its budget is task.* ({task.describe()}), its optimizer "
            f"Adam at optim.lr. metaloss-{app} reads, of the run's settings: {read} "
            "(and logger, progress, threads; metaloss.cli.own_loop)"
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
    task = _sized(cfg, task)
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
    """The keys a task's ``train`` returns: its kind's metrics, test and validation."""
    return metric_names(task.kind, "test") + metric_names(task.kind, "val")


def meta(cfg: DictConfig, run_dir: RunDir, task: Any, loss_name: str | None) -> dict:
    """metaloss-meta: CMA-ES over the learned loss (``learned_loss.pt``, ``search.json``), then
    the meta-test against ``compare`` (``comparison.json`` / ``.md`` / ``.png``). search.json
    grows a row per generation, so a stopped run keeps its history; there is no checkpoint to
    resume from, and a directory that holds a finished search is refused. A search in which
    every candidate diverged, or a learned loss that diverges in the meta-test, stops the run
    with an error (exit 1) after its files are written."""
    lr = _check_settings(cfg, task, "meta")
    task = _sized(cfg, task)
    metric = cfg.meta_test.metric or task.primary_metric
    if metric not in _metric_names(task):
        raise ConfigError(f"meta_test.metric = {metric!r}: one of {', '.join(_metric_names(task))}")
    if (run_dir.path / "learned_loss.pt").exists():
        raise ConfigError(
            f"{run_dir.path} holds a finished search already; a task with a loop of its own has "
            "no checkpoint to continue it from: choose another hydra.run.dir"
        )
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
        rows: list[dict] = []

        def progress(row: dict) -> None:
            rows.append(row)
            write_json(run_dir.path / "search.json", {"task": task.name, "history": rows})
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
        if all(math.isnan(v) for r in history for k, v in r.items() if k.startswith("best_")):
            raise NonFiniteLoss(
                f"every candidate of every generation diverged (NaN/inf) at optim.lr = {lr:g}; "
                f"nothing was learned (history: {run_dir.path / 'search.json'}). Lower optim.lr "
                "or meta_optim.sigma0"
            )
        path = save_learned_loss(
            loss,
            run_dir.path / "learned_loss.pt",
            task=task.name,
            loss_name=loss_name,
            steps=generations,
            complete=True,
            setup=training_setup(cfg),
        )
        log.info("learned loss: %s", path)
        out: dict = {"learned_loss": str(path), "history": history}
        if not test:
            return out
        losses = {"learned": loss, **baselines}
        seeds = list(range(int(cfg.meta_test.seeds)))
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
    diverged = [s for s, v in zip(seeds, results["learned"][metric]) if not math.isfinite(v)]
    if diverged:
        raise NonFiniteLoss(
            f"the learned loss diverged (NaN/inf) in the meta-test on seed(s) {diverged}: no "
            f"verdict ({run_dir.path / 'comparison.json'})"
        )
    return {**out, "significance": sig}


def _show(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())

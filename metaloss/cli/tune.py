"""`metaloss-tune`: tune every `compare:` baseline's hyper-parameters and learning rate on the
validation split (Optuna, seeded TPE; see metaloss.tune), and write `tuned.json`, which the
meta-test takes with `meta_test.tuned=<that file>`.

    metaloss-tune task=digits compare=[ce,focal,label_smoothing] tune.n_trials=20
    metaloss-tune experiment=mnist1d_taylorglo tune.n_trials=null tune.budget_steps=meta
    metaloss-meta experiment=mnist1d_taylorglo meta_test.tuned=outputs/tune/<run>/tuned.json
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from hydra.conf import HydraConf
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaloss.cli import own_loop
from metaloss.cli.app import hydra_command, output_dir, run_command
from metaloss.cli.logger import open_logger, write_json
from metaloss.config import (
    DEFAULT_BASELINES,
    baselines_for,
    instantiate_loss,
    load_option,
    loss_option,
)
from metaloss.metrics import HIGHER_IS_BETTER
from metaloss.report import jsonable
from metaloss.runs import RunDir, hydra_record
from metaloss.runtime import task_pool
from metaloss.tune import (
    TUNE_SEEDS,
    TUNED_FORMAT,
    TunedFileError,
    at_edge,
    learned_loss_cost,
    load_tuned,
    lr_range,
    setup_record,
    space_for,
    trials_for_budget,
    tune_loss,
    tuned_problems,
    validation_score,
)
from metaloss.validate import check_against_task

log = logging.getLogger("metaloss")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """The app body, callable without Hydra's launcher. Settings are checked and the run
    directory claimed before any data is made."""
    own_loop.refuse_in("tune", cfg.task)
    return run_command(cfg, out_dir, "tune", _work)


def tune_metric(cfg: DictConfig, task) -> str:
    """``tune.metric``, else the validation twin of the meta-test's metric."""
    if cfg.tune.metric is not None:
        return str(cfg.tune.metric)
    return "val/" + str(cfg.meta_test.metric or task.primary_metric).split("/", 1)[1]


def learned_cost(cfg: DictConfig, task: Any) -> int:
    """The learned loss's meta-training cost (CMA-ES's λ needs φ's size: the loss is built to
    count it)."""
    return learned_loss_cost(
        cfg, sum(p.numel() for p in instantiate_loss(cfg.loss, task).parameters())
    )


# the studies of a run, one per loss: Optuna's own storage, so a killed run resumes
JOURNAL = "optuna.journal"


def _finished(cfg: DictConfig, out: Path) -> dict | None:
    """The complete tuned.json this run directory already holds (the same config: RunDir
    checked its identity), else None. A complete result is never tuned again nor overwritten;
    one that is not a valid tuned.json any more (edited by hand) is refused, not replaced."""
    if not out.is_file():
        return None
    try:
        done = load_tuned(out)
    except TunedFileError as e:
        raise TunedFileError(
            f"{out} is in the way: {e}. metaloss-tune never overwrites it: move it away, or "
            "choose another hydra.run.dir"
        ) from e
    if not done.get("complete"):
        return None
    names = [str(n) for n in (cfg.compare or ())]
    if names and set(names) != set(done["losses"]):
        raise TunedFileError(
            f"{out} is complete but holds {', '.join(done['losses'])}, not {', '.join(names)}: "
            "metaloss-tune never overwrites a complete tuned.json; choose another hydra.run.dir"
        )
    return done


def _storage(run_dir: Path):
    """The run's Optuna journal (JournalStorage: one append-only file). We hold the run
    directory's lock, so a journal lock left by a killed process is stale, and a last line a
    ``kill -9`` cut short is dropped (Optuna would refuse the next line appended to it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = run_dir / JOURNAL
    Path(f"{path}.lock").unlink(missing_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning(
                "%s: dropping a last record cut short by a killed process (%d bytes)",
                path,
                len(data) - keep,
            )
            with open(path, "r+b") as f:
                f.truncate(keep)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


@dataclass(frozen=True)
class Plan:
    """What a tuning run does, decided from the config before any trial."""

    names: list[str]  # the baselines, tuned one after another
    metric: str  # the validation metric tuned on (:func:`tune_metric`)
    direction: str  # "maximize" or "minimize"
    lr0: float  # the inner learning rate a baseline has untuned
    steps: int  # inner steps of one trial's training
    batch_size: Any
    seeds: list[int]
    cost: int  # inner steps of one model per trial (see metaloss.tune)
    budget: int | None  # tune.budget_steps, resolved
    n_trials: int


def _plan(cfg: DictConfig, pool: list, names: list[str], inner_opt: Any) -> Plan:
    tc, task = cfg.tune, pool[0]
    metric = tune_metric(cfg, task)
    steps = int(tc.steps if tc.steps is not None else cfg.meta_test.steps)
    seeds = [TUNE_SEEDS + j for j in range(int(tc.seeds))]
    cost = steps * len(seeds) * len(pool)
    if tc.budget_steps is not None:
        budget = learned_cost(cfg, task) if tc.budget_steps == "meta" else int(tc.budget_steps)
        n_trials = trials_for_budget(budget, cost)
    else:
        budget, n_trials = None, int(tc.n_trials)
    return Plan(
        names=names,
        metric=metric,
        direction="maximize" if HIGHER_IS_BETTER[metric.split("/", 1)[1]] else "minimize",
        lr0=float(cfg.meta_test.lr if cfg.meta_test.lr is not None else inner_opt.hparams["lr"]),
        steps=steps,
        batch_size=cfg.meta_test.batch_size,
        seeds=seeds,
        cost=cost,
        budget=budget,
        n_trials=n_trials,
    )


def _work(cfg: DictConfig, run_dir: RunDir, device: torch.device, dtype: torch.dtype) -> dict:
    out = run_dir.path / "tuned.json"
    done = _finished(cfg, out)
    if done is not None:
        log.warning(
            "%s is complete (%s): nothing to tune, nothing overwritten. To tune again, choose "
            "another hydra.run.dir (or move that file away)",
            out,
            ", ".join(done["losses"]),
        )
        return done
    torch.manual_seed(cfg.seed)
    pool = [t.to(device, dtype) for t in task_pool(cfg)]
    task = pool[0]
    check_against_task(cfg, task)
    names = list(cfg.compare or DEFAULT_BASELINES[task.kind])
    baselines_for(names, task, cfg)  # unknown names and losses that do not fit: refused now
    inner_opt = instantiate(cfg.optim)
    plan = _plan(cfg, pool, names, inner_opt)
    factory = instantiate(cfg.model)
    run_dir.record(hydra_record(cfg))
    _log_plan(plan, task, len(pool))
    score = functools.partial(_score, cfg, plan, pool, factory, inner_opt)
    record = _record_head(cfg, plan, task, inner_opt, len(pool))
    storage = _storage(run_dir.path)
    name = f"tune-{task.name}-s{cfg.seed}"
    with open_logger(cfg, run_dir.path, job_type="tune", name=name) as logger:
        for loss_name in plan.names:
            entry = _tune_one(cfg, plan, loss_name, score, storage, logger, run_dir.path)
            record["losses"][loss_name] = entry
            record["complete"] = loss_name == plan.names[-1]
            bad = tuned_problems(jsonable(record))  # never write a file the meta-test refuses
            if bad:  # (say, a journal edited by hand): nothing written
                raise TunedFileError(
                    f"{run_dir.path / JOURNAL} gave values that are not a valid tuned.json: "
                    + "; ".join(bad)
                )
            write_json(out, record)  # after every loss: an interruption keeps the finished ones
            _log_result(plan, loss_name, entry, logger)
    log.info("tuned baselines written to %s (meta-test with meta_test.tuned=%s)", out, out)
    return record


def _log_plan(plan: Plan, task: Any, n_tasks: int) -> None:
    log.info(
        "tuning %s on %s: %d trials of %d inner steps each (%d steps x %d seeds x %d tasks)%s, "
        "%s %s",
        ", ".join(plan.names),
        task.describe(),
        plan.n_trials,
        plan.cost,
        plan.steps,
        len(plan.seeds),
        n_tasks,
        f", budget {plan.budget} steps per loss" if plan.budget is not None else "",
        plan.direction,
        plan.metric,
    )


def _score(
    cfg: DictConfig, plan: Plan, pool: list, factory: Any, inner_opt: Any,
    name: str, params: dict, lr: float,
) -> float:  # fmt: skip
    """One trial: ``name`` with ``params`` at inner lr ``lr`` (:func:`validation_score`)."""
    return validation_score(
        name,
        loss_option(name, pool[0], cfg, params),
        pool,
        factory,
        inner_opt,
        instantiate(cfg.optim, lr=lr),
        lr=lr,
        seeds=plan.seeds,
        steps=plan.steps,
        batch_size=plan.batch_size,
        metric=plan.metric,
    )


def _record_head(cfg: DictConfig, plan: Plan, task: Any, inner_opt: Any, n_tasks: int) -> dict:
    """tuned.json before any loss is tuned: what was tuned, how, and at what budget."""
    return {
        "format": TUNED_FORMAT,
        "task": task.name,
        "optim": inner_opt.name,
        **setup_record(cfg, n_tasks),
        "steps": plan.steps,
        "metric": plan.metric,
        "direction": plan.direction,
        "seeds": plan.seeds,
        "tasks": n_tasks,
        "default_lr": plan.lr0,
        "sampler": f"TPESampler(seed=metaloss.tune.trial_seed({int(cfg.tune.seed)}, i)) for the "
        "i-th trial",
        "budget": {
            "budget_steps": plan.budget,
            "cost_per_trial": plan.cost,
            "n_trials": plan.n_trials,
            "steps_used": plan.n_trials * plan.cost,
            "lr_range": _searched_lrs(cfg, plan.lr0),
            "sampler_seed": int(cfg.tune.seed),
        },
        "complete": False,
        "losses": {},
    }


def _searched_lrs(cfg: DictConfig, lr0: float) -> list[float] | None:
    """The lr range every baseline's study searches, as tuned.json records it (None: no lr)."""
    if not cfg.tune.lr:
        return None
    span = lr_range(lr0, cfg.tune.lr_range)
    return [span.low, span.high]


def _tune_one(
    cfg: DictConfig,
    plan: Plan,
    name: str,
    score: Callable[..., float],
    storage: Any,
    logger: Any,
    run_path: Path,
) -> dict:
    """Tune one baseline (its Optuna study in the run's journal); its tuned.json entry."""
    tc = cfg.tune
    option = load_option("loss", name, cfg)
    space = space_for(str(option.get("_target_")))
    defaults = {
        k: v
        for k, v in cast(dict, OmegaConf.to_container(option, resolve=True)).items()
        if k in space and isinstance(v, int | float)
    }

    def on_trial(i: int, p: dict, value: float) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in p.items())
        log.info(
            "%s trial %d/%d: %s -> %s = %.4f", name, i + 1, plan.n_trials, shown, plan.metric, value
        )
        logger.summary({f"tune/{name}/trial{i}/{plan.metric}": value})

    lr_space = lr_range(plan.lr0, tc.lr_range) if tc.lr else None
    result = tune_loss(
        functools.partial(score, name),
        space,
        defaults,
        lr=plan.lr0,
        lr_space=lr_space,
        n_trials=plan.n_trials,
        direction=plan.direction,
        seed=int(tc.seed),
        on_trial=on_trial,
        storage=storage,
        study_name=name,
    )
    _log_study(name, result, run_path, {**defaults, "lr": plan.lr0})
    searched = {**space, **({"lr": lr_space} if lr_space else {})}
    return _entry(str(option.get("_target_")), result, defaults, plan.cost, searched)


def _entry(target: str, result: Any, defaults: dict, cost: int, searched: dict) -> dict:
    """A tuned baseline as tuned.json records it."""
    return {
        "target": target,
        "params": result.params,
        "lr": result.lr,
        "best_val": result.best_val,
        "default_val": result.default_val,
        "default_params": {k: float(v) for k, v in defaults.items()},
        "default_outside_range": result.default_outside_range,
        "n_trials": result.n_trials,
        "n_diverged": result.n_diverged,
        "steps_used": result.n_trials * cost,
        "at_edge": at_edge({**result.params, "lr": result.lr}, searched),
        "trials": result.trials,
    }


def _log_study(name: str, result: Any, run_path: Path, defaults: dict) -> None:
    """What a study's result says besides its values: resumed, or a default outside the range."""
    if result.resumed:
        log.info(
            "%s: resumed from %s: %d of %d trials were done already",
            name,
            run_path / JOURNAL,
            min(result.resumed, result.n_trials),
            result.n_trials,
        )
    if result.default_outside_range:
        log.warning(
            "%s: the default (%s) lies outside the range searched; it was evaluated as it is "
            "(trial 0, default_val) and the tuned choice is the better of it and the trials",
            name,
            ", ".join(f"{k}={v:.4g}" for k, v in defaults.items()),
        )


def _log_result(plan: Plan, name: str, entry: dict, logger: Any) -> None:
    chosen = {**entry["params"], "lr": entry["lr"] or plan.lr0}
    log.info(
        "%s: best %s = %.4f (default %.4f) with %s",
        name,
        plan.metric,
        entry["best_val"],
        entry["default_val"],
        ", ".join(f"{k}={v:.4g}" for k, v in chosen.items()),
    )
    logger.summary(
        {
            f"tune/{name}/best_val": entry["best_val"],
            f"tune/{name}/default_val": entry["default_val"],
        }
    )
    if entry["at_edge"]:
        log.warning(
            "%s: tuned %s at the edge of the range searched, so the best value may lie outside "
            "it%s",
            name,
            ", ".join(entry["at_edge"]),
            " (widen tune.lr_range=[low,high])" if "lr" in entry["at_edge"] else "",
        )


def _app(cfg: DictConfig, hc: HydraConf) -> float | None:
    out = run(cfg, output_dir(hc))
    vals = [e["best_val"] for e in out["losses"].values()]
    return max(vals) if out["direction"] == "maximize" else min(vals)


main = hydra_command("tune", _app)

if __name__ == "__main__":
    main()

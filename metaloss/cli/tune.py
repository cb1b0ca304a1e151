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
import math
from pathlib import Path
from typing import cast

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaloss import runtime
from metaloss.cli.logger import open_logger, write_json
from metaloss.cli.meta import task_pool
from metaloss.cli.signals import console, exit_on_interrupt, interruptible
from metaloss.cli.train import LOCAL_KEYS
from metaloss.config import (
    DEFAULT_BASELINES,
    baselines_for,
    conf_dir,
    instantiate_loss,
    load_option,
    loss_option,
)
from metaloss.metatest import compare_losses
from metaloss.metrics import HIGHER_IS_BETTER
from metaloss.report import jsonable
from metaloss.runs import RunDir, hydra_record, identity
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
)
from metaloss.validate import check_against_task, check_config

log = logging.getLogger("metaloss")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """The app body, callable without Hydra's launcher. Settings are checked and the run
    directory claimed before any data is made."""
    check_config(cfg)
    device, dtype = runtime.setup(cfg)
    with RunDir(out_dir, "tune", identity(cfg, ignore=LOCAL_KEYS)) as run_dir, interruptible():
        return _run(cfg, run_dir, device, dtype)


def tune_metric(cfg: DictConfig, task) -> str:
    """``tune.metric``, else the validation twin of the meta-test's metric."""
    if cfg.tune.metric is not None:
        return str(cfg.tune.metric)
    return "val/" + str(cfg.meta_test.metric or task.primary_metric).split("/", 1)[1]


def _learned_cost(cfg: DictConfig, task) -> int:
    """The learned loss's meta-training cost (CMA-ES's λ needs φ's size: the loss is built to count it)."""
    return learned_loss_cost(
        cfg, sum(p.numel() for p in instantiate_loss(cfg.loss, task).parameters())
    )


JOURNAL = "optuna.journal"  # the studies of a run, one per loss: Optuna's own storage, so a killed run resumes


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


def _run(cfg: DictConfig, run_dir: RunDir, device: torch.device, dtype: torch.dtype) -> dict:
    tc = cfg.tune
    out = run_dir.path / "tuned.json"
    done = _finished(cfg, out)
    if done is not None:
        log.warning(
            "%s is complete (%s): nothing to tune, nothing overwritten. To tune again, choose another "
            "hydra.run.dir (or move that file away)",
            out,
            ", ".join(done["losses"]),
        )
        return done
    torch.manual_seed(cfg.seed)
    pool = [t.to(device, dtype) for t in task_pool(cfg)]
    task = pool[0]
    check_against_task(cfg, task)
    names = list(cfg.compare or DEFAULT_BASELINES[task.kind])
    baselines_for(
        names, task, cfg
    )  # unknown names and losses that do not fit: refused before training
    metric = tune_metric(cfg, task)
    direction = "maximize" if HIGHER_IS_BETTER[metric.split("/", 1)[1]] else "minimize"
    inner_opt = instantiate(cfg.optim)
    lr0 = float(cfg.meta_test.lr if cfg.meta_test.lr is not None else inner_opt.hparams["lr"])
    steps = int(tc.steps if tc.steps is not None else cfg.meta_test.steps)
    batch_size = cfg.meta_test.batch_size
    seeds = [TUNE_SEEDS + j for j in range(int(tc.seeds))]
    cost = steps * len(seeds) * len(pool)  # inner steps of one model per trial (see metaloss.tune)
    if tc.budget_steps is not None:
        budget = _learned_cost(cfg, task) if tc.budget_steps == "meta" else int(tc.budget_steps)
        n_trials = trials_for_budget(budget, cost)
    else:
        budget, n_trials = None, int(tc.n_trials)
    factory = instantiate(cfg.model)
    run_dir.record(hydra_record(cfg))
    log.info(
        "tuning %s on %s: %d trials of %d inner steps each (%d steps x %d seeds x %d tasks)%s, %s %s",
        ", ".join(names),
        task.describe(),
        n_trials,
        cost,
        steps,
        len(seeds),
        len(pool),
        f", budget {budget} steps per loss" if budget is not None else "",
        direction,
        metric,
    )

    def score(name: str, params: dict, lr: float) -> float:
        loss = loss_option(name, task, cfg, params)
        make_optimizer = functools.partial(
            inner_opt.torch_equivalent.func, **{**inner_opt.hparams, "lr": lr}
        )
        results = compare_losses(
            lambda seed: pool,
            factory,
            {name: loss},
            make_optimizer,
            seeds=seeds,
            steps=steps,
            batch_size=batch_size,
            progress=False,
            vectorised=instantiate(cfg.optim, lr=lr),
        )
        values = results[name][metric]
        return (
            float(sum(values) / len(values)) if all(math.isfinite(v) for v in values) else math.nan
        )

    record = {
        "format": TUNED_FORMAT,
        "task": task.name,
        "optim": inner_opt.name,
        **setup_record(cfg, len(pool)),
        "steps": steps,
        "metric": metric,
        "direction": direction,
        "seeds": seeds,
        "tasks": len(pool),
        "default_lr": lr0,
        "sampler": f"TPESampler(seed=metaloss.tune.trial_seed({int(tc.seed)}, i)) for the i-th trial",
        "budget": {
            "budget_steps": budget,
            "cost_per_trial": cost,
            "n_trials": n_trials,
            "steps_used": n_trials * cost,
        },
        "complete": False,
        "losses": {},
    }
    storage = _storage(run_dir.path)
    with open_logger(
        cfg, run_dir.path, job_type="tune", name=f"tune-{task.name}-s{cfg.seed}"
    ) as logger:
        for name in names:
            option = load_option("loss", name, cfg)
            space = space_for(str(option.get("_target_")))
            defaults = {
                k: v
                for k, v in cast(dict, OmegaConf.to_container(option, resolve=True)).items()
                if k in space and isinstance(v, int | float)
            }

            def on_trial(i: int, p: dict, value: float, name: str = name) -> None:
                log.info(
                    "%s trial %d/%d: %s -> %s = %.4f",
                    name,
                    i + 1,
                    n_trials,
                    ", ".join(f"{k}={v:.4g}" for k, v in p.items()),
                    metric,
                    value,
                )
                logger.summary({f"tune/{name}/trial{i}/{metric}": value})

            lr_space = lr_range(lr0, tc.lr_range) if tc.lr else None
            result = tune_loss(
                functools.partial(score, name),
                space,
                defaults,
                lr=lr0,
                lr_space=lr_space,
                n_trials=n_trials,
                direction=direction,
                seed=int(tc.seed),
                on_trial=on_trial,
                storage=storage,
                study_name=name,
            )
            if result.resumed:
                log.info(
                    "%s: resumed from %s: %d of %d trials were done already",
                    name,
                    run_dir.path / JOURNAL,
                    min(result.resumed, result.n_trials),
                    result.n_trials,
                )
            if result.default_outside_range:
                log.warning(
                    "%s: the default (%s) lies outside the range searched; it was evaluated as it is "
                    "(trial 0, default_val) and the tuned choice is the better of it and the trials",
                    name,
                    ", ".join(f"{k}={v:.4g}" for k, v in {**defaults, "lr": lr0}.items()),
                )
            edges = at_edge(
                {**result.params, "lr": result.lr},
                {**space, **({"lr": lr_space} if lr_space else {})},
            )
            record["losses"][name] = {
                "target": str(option.get("_target_")),
                "params": result.params,
                "lr": result.lr,
                "best_val": result.best_val,
                "default_val": result.default_val,
                "default_params": {k: float(v) for k, v in defaults.items()},
                "default_outside_range": result.default_outside_range,
                "n_trials": result.n_trials,
                "n_diverged": result.n_diverged,
                "steps_used": result.n_trials * cost,
                "at_edge": edges,
                "trials": result.trials,
            }
            record["complete"] = name == names[-1]
            bad = tuned_problems(jsonable(record))  # never write a file the meta-test would refuse
            if bad:  # (say, a journal edited by hand): nothing written
                raise TunedFileError(
                    f"{run_dir.path / JOURNAL} gave values that are not a valid tuned.json: "
                    + "; ".join(bad)
                )
            write_json(out, record)  # after every loss: an interruption keeps the finished ones
            log.info(
                "%s: best %s = %.4f (default %.4f) with %s",
                name,
                metric,
                result.best_val,
                result.default_val,
                ", ".join(
                    f"{k}={v:.4g}" for k, v in {**result.params, "lr": result.lr or lr0}.items()
                ),
            )
            logger.summary(
                {
                    f"tune/{name}/best_val": result.best_val,
                    f"tune/{name}/default_val": result.default_val,
                }
            )
            if edges:
                log.warning(
                    "%s: tuned %s at the edge of the range searched, so the best value may lie outside it%s",
                    name,
                    ", ".join(edges),
                    " (widen tune.lr_range=[low,high])" if "lr" in edges else "",
                )
    log.info("tuned baselines written to %s (meta-test with meta_test.tuned=%s)", out, out)
    return record


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="tune")
def _hydra_main(cfg: DictConfig) -> float | None:
    with exit_on_interrupt():
        out = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    vals = [e["best_val"] for e in out["losses"].values()]
    return max(vals) if out["direction"] == "maximize" else min(vals)


def main() -> None:
    """The console script (SIGTERM forwarded to parallel jobs, exit 128 + signal)."""
    console(_hydra_main)


if __name__ == "__main__":
    main()

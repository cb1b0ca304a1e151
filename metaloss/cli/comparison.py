"""The meta-test as the entry points run it: learned loss vs the `compare:` baselines,
printed, saved as comparison.json / comparison.md / comparison.png, logged to W&B.

comparison.json is written first, before any picture, so a diverged loss or a plotting
problem never costs the numbers; non-finite values in it are ``null``."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaloss import kinds
from metaloss.cli.logger import write_json
from metaloss.config import DEFAULT_BASELINES, baselines_for, load_option
from metaloss.figures import comparison_figure
from metaloss.metatest import compare_losses, format_number, significance
from metaloss.metrics import train_result_names
from metaloss.plots import loss_curves, plot_losses
from metaloss.report import format_table, summarize
from metaloss.runtime import canonical_draws
from metaloss.tasks.base import DRAW_STRIDE, TEST_TASK_SEEDS
from metaloss.tune import (
    learned_tuning_problems,
    load_tuned,
    setup_record,
    tune_learned_lr,
    tuned_for,
    validation_score,
)
from metaloss.validate import ConfigError

log = logging.getLogger("metaloss")


def fresh_draws(cfg: DictConfig, task) -> bool:
    """Whether each meta-test seed draws its own data: always for a task family (sine);
    for a single data set when ``meta_test.fresh_draws`` (a new train/val split, noise draw
    and imbalance subsample from the same generator, as ``task.seed`` draws them)."""
    return bool(task.distribution or cfg.meta_test.get("fresh_draws", False))


def tasks_for_seed_fn(cfg: DictConfig, pool: list):
    """Meta-test tasks for a seed: fresh draws (a task family, or ``meta_test.fresh_draws``),
    from task seeds disjoint from those of meta-training and tuning; else the task itself."""
    if not fresh_draws(cfg, pool[0]):
        return lambda seed: pool[:1]
    per = int(cfg.meta_test.tasks_per_seed)
    # a single data set's draw also seeds its imbalance and noise draws with seed + 1, + 2:
    # its draws are spaced 3 apart so that no two share a generator seed (a family: 1, as recorded)
    stride = 1 if pool[0].distribution else DRAW_STRIDE
    overrides = dict(cfg.meta_test.get("task_overrides") or {})  # e.g. a wider test distribution
    x = pool[0].x_train  # fresh test tasks go where the training tasks are

    def tasks(seed: int) -> list:
        with canonical_draws():  # the same test tasks in a float32 and a float64 run
            drawn = [
                instantiate(cfg.task, **overrides, seed=TEST_TASK_SEEDS + stride * (seed * per + i))
                for i in range(per)
            ]
        return [t.to(x.device, x.dtype) for t in drawn]

    return tasks


def format_verdict(sig: dict) -> str:
    """The verdict paragraph: learned vs the reference baseline (chosen on validation), the
    paired difference with its CI and d_z, the p-values (paired, Holm-adjusted over the
    baselines: decides; Welch for reference), the verdict, then every pairwise comparison."""
    if not sig:
        return ""
    n = sig["n_seeds"]
    ours = format_number(sig["learned_mean"]) + (
        f" ({sig['learned_n_nan']}/{n} NaN)" if sig["learned_n_nan"] else ""
    )
    best = sig["best_baseline"] or "none without NaN"
    level = f"{100 * sig['ci_level']:.0f}%"
    pairwise = sig.get("pairwise") or {}
    head = (
        f"learned vs reference baseline ({best}), chosen on "
        f"{sig.get('selected_on', sig['metric'])} before "
        f"testing, on {sig['metric']}: {ours} vs {format_number(sig['best_baseline_mean'])}; "
        f"paired difference {format_number(sig['difference'])} "
        f"[{level} CI {format_number(sig['ci_low'])}, "
        f"{format_number(sig['ci_high'])}], d_z = {format_number(sig['cohens_dz'], '.2f')}; "
        f"paired t p = {format_number(sig['p_value'], '.3g')}, "
        f"Holm-adjusted over {len(pairwise)} baseline(s) "
        f"p = {format_number(sig.get('p_value_holm', math.nan), '.3g')}, "
        f"Welch p = {format_number(sig['p_value_welch'], '.3g')} "
        f"-> {sig['verdict']}"
        + (
            ""
            if sig["verdict"].startswith("undefined")
            else " (paired t-test, Holm-adjusted, decides)"
        )
    )
    if len(pairwise) < 2:
        return head
    rows = [
        f"  vs {name}: difference {format_number(r['difference'])}, "
        f"p = {format_number(r['p_value'], '.3g')}, Holm p = "
        f"{format_number(r['p_value_holm'], '.3g')} -> {r['verdict']}"
        for name, r in pairwise.items()
    ]
    return head + "\nevery baseline (paired t-test, Holm-adjusted):\n" + "\n".join(rows)


def _plottable(losses: dict[str, Callable], task) -> dict[str, Callable]:
    """The losses whose curve has a finite point: an all-NaN learned loss has nothing to draw."""
    _, curves, _ = loss_curves(losses, task.kind, task.num_classes, class_counts=task.class_counts)
    keep = {n: losses[n] for n, y in curves.items() if bool(torch.isfinite(y).any())}
    for n in losses.keys() - keep.keys():
        log.warning(
            "meta-test: %s left out of learned_vs_baselines.png (no finite value to draw)", n
        )
    return keep


def _config_params(option: DictConfig) -> dict:
    """A loss option's own settings, as its config gives them."""
    values = cast(dict, OmegaConf.to_container(option, resolve=True))
    return {k: v for k, v in values.items() if k not in ("_target_", "_partial_")}


def _baseline_settings(
    cfg: DictConfig, task, inner_opt, lr: float, n_tasks: int | None = None
) -> dict[str, dict]:
    """Per `compare:` loss: the hyper-parameters and learning rate it is trained with, and
    where they come from. ``meta_test.tuned`` (a tuned.json of metaloss-tune): the tuned
    values (a loss tuned without its lr keeps the meta-test's ``lr``), refused unless the
    file fits this run (metaloss.tune.tuned_for; ``n_tasks``: the run's task pool); else the
    loss's config."""
    names = list(cfg.compare or DEFAULT_BASELINES[task.kind])
    options = {n: load_option("loss", n, cfg) for n in names}
    config = {n: _config_params(o) for n, o in options.items()}
    path = cfg.meta_test.get("tuned")
    if path is None:
        return {
            n: {
                "params": config[n],
                "lr": lr,
                "source": "config",
                "overrides": {},
                "tuning_steps": None,
            }
            for n in names
        }
    record = load_tuned(path)
    tuned = tuned_for(
        record,
        names,
        task=task.name,
        optim=inner_opt.name,
        targets={n: str(o.get("_target_")) for n, o in options.items()},
        setup=setup_record(cfg, n_tasks),
        test_seeds=int(cfg.meta_test.seeds),
        test_metric=str(cfg.meta_test.metric or task.primary_metric),
    )
    return {
        n: {
            "params": {**config[n], **e["params"]},
            "lr": lr if e.get("lr") is None else float(e["lr"]),
            "source": f"tuned ({record['path']})",
            "overrides": dict(e["params"]),
            "tuning_steps": e.get("steps_used"),
        }
        for n, e in tuned.items()
    }


def check_tuned(cfg: DictConfig, pool: list, inner_opt) -> None:
    """Refuse a ``meta_test.tuned`` file that does not fit this run before any training:
    metaloss-meta calls it before meta-training, metaloss-eval before the meta-test."""
    if cfg.meta_test.get("tuned") is not None:
        lr = cfg.meta_test.lr if cfg.meta_test.lr is not None else inner_opt.hparams["lr"]
        _baseline_settings(cfg, pool[0], inner_opt, lr, len(pool))
        if cfg.meta_test.get("tune_learned_lr", False):
            problems = learned_tuning_problems(load_tuned(str(cfg.meta_test.tuned)))
            if problems:
                raise ConfigError(
                    "meta_test.tune_learned_lr = true: the learned loss's lr cannot be tuned "
                    "as the baselines' was: " + "; ".join(problems)
                )


def protocol_record(cfg: DictConfig, task, settings: dict[str, dict], inner: int | None) -> dict:
    """What a reviewer checks first, recorded with the comparison and warned about when it
    departs from the protocol (docs/protocol.md): matched horizons (``inner``: the training
    steps the loss was meta-trained for — K offline, the whole run online; None when unknown,
    as in metaloss-eval — vs the steps every loss trains in the meta-test), fresh data draws
    per seed, and baselines tuned rather than at their config defaults."""
    steps = int(cfg.meta_test.steps)
    untuned = sorted(n for n, s in settings.items() if s["source"] == "config")
    note = cfg.meta_test.get("horizon_note")
    out = {
        "meta_training_horizon": inner,
        "meta_test_steps": steps,
        "horizon_matched": None if inner is None else int(inner) == steps,
        "horizon_note": note,
        "fresh_draws": fresh_draws(cfg, task),
        "untuned_baselines": untuned,
    }
    if inner is not None and int(inner) != steps and note:
        log.info(
            "meta-test: meta-trained with %d inner steps, tested with %d, as declared: %s",
            int(inner),
            steps,
            note,
        )
    elif inner is not None and int(inner) != steps:
        log.warning(
            "meta-test: the loss was meta-trained with %d inner steps "
            "but every loss trains %d steps here "
            "(a mismatched horizon; set meta_test.steps=%d to match, "
            "or state why in meta_test.horizon_note)",
            int(inner),
            steps,
            int(inner),
        )
    if not out["fresh_draws"]:
        log.warning(
            "meta-test: every seed trains on the meta-training draw of %s "
            "(meta_test.fresh_draws=false): "
            "the seeds measure initialisation and batch order, not the task",
            task.name,
        )
    if untuned:
        log.warning(
            "meta-test: baselines at their config defaults, not tuned: %s (metaloss-tune, then "
            "meta_test.tuned=<tuned.json>)",
            ", ".join(untuned),
        )
    return out


def run_meta_test(
    cfg: DictConfig,
    learned,
    pool: list,
    inner_opt,
    out_dir: Path,
    logger,
    meta_training_steps: int | None = None,
    meta_horizon: int | None = None,
    learned_lr: float | None = None,
) -> dict:
    """``meta_training_steps``: what meta-training the learned loss cost (metaloss-meta knows it;
    metaloss-eval does not), recorded beside each tuned baseline's tuning compute.
    ``learned_lr``: the loss's meta-learned inner lr (``meta.learn_inner_lr``), which it
    trains with; else the meta-test's lr, or with ``meta_test.tune_learned_lr`` an lr tuned
    exactly as each baseline's was (:func:`learned_setting`)."""
    task = pool[0]
    lr = cfg.meta_test.lr if cfg.meta_test.lr is not None else inner_opt.hparams["lr"]
    settings = _baseline_settings(cfg, task, inner_opt, lr, len(pool))
    overrides = {n: s["overrides"] for n, s in settings.items()}
    losses = {"learned": learned, **baselines_for(list(settings), task, cfg, overrides)}
    seeds, metric = _check_test_settings(cfg, task)
    origin = "learned" if learned_lr is None else "meta-learned (meta.learn_inner_lr)"
    lr0 = lr if learned_lr is None else learned_lr
    if learned_lr is None and lr != inner_opt.hparams["lr"] and not cfg.meta_test.tune_learned_lr:
        log.warning(
            "meta-test: the learned loss was searched at optim.lr = %.4g and is tested at "
            "meta_test.lr = %.4g, untuned (meta_test.tune_learned_lr=true tunes it as the "
            "baselines' lrs were)",
            inner_opt.hparams["lr"],
            lr,
        )
    own = learned_setting(cfg, pool, learned, inner_opt, lr0, origin)
    if meta_training_steps is not None:  # the learned loss's compute: its search, its lr tuning
        _warn_short_tuning(settings, meta_training_steps + int(own.get("tuning_steps") or 0))
    lrs = {"learned": own["lr"], **{n: s["lr"] for n, s in settings.items()}}
    _log_plan(cfg, losses, lrs, inner_opt, len(seeds))
    results = _train_all(cfg, pool, losses, lrs, inner_opt, seeds)
    hyperparameters = {
        "learned": {"params": None, **own, "meta_training_steps": meta_training_steps},
        **{n: {k: s[k] for k in _SETTING_KEYS} for n, s in settings.items()},
    }
    sig = significance(results, metric, alpha=float(cfg.meta_test.alpha))
    record = {
        "task": task.name,
        "metric": metric,
        "seeds": seeds,
        "results": results,
        "significance": sig,
        "hyperparameters": hyperparameters,
        "protocol": protocol_record(cfg, task, settings, meta_horizon),
        "null_means": "NaN: the loss diverged on that seed, or the statistic is undefined",
    }
    if own["lr"] != own.get("default_lr", own["lr"]):  # tuned: the default lr's results too
        at_default = {"learned": own["default_lr"]}
        trained = _train_all(cfg, pool, {"learned": learned}, at_default, inner_opt, seeds)
        record["learned_at_default_lr"] = {"lr": own["default_lr"], "results": trained["learned"]}
    write_comparison(record, losses, task, out_dir, logger)
    return {"results": results, "significance": sig}


_SETTING_KEYS = ("params", "lr", "source", "tuning_steps")  # a baseline's, as recorded


def learned_setting(
    cfg: DictConfig, pool: list, learned: Any, inner_opt: Any, lr0: float, origin: str = "learned"
) -> dict[str, Any]:
    """The inner lr the learned loss trains with in the meta-test, and where it comes from:
    ``lr0`` (the meta-test's lr, or the loss's meta-learned one); with
    ``meta_test.tune_learned_lr`` the lr :func:`metaloss.tune.tune_learned_lr` picks on the
    validation split with the machinery and budget the baselines' tuned.json records (its
    trials, seeds, steps and metric), starting from ``lr0`` — fair in both directions.
    ``origin``: where ``lr0`` comes from, the record's ``source``."""
    if not cfg.meta_test.get("tune_learned_lr", False):
        return {"lr": lr0, "source": origin}
    path = str(cfg.meta_test.tuned)  # required with tune_learned_lr (metaloss.validate)
    record = load_tuned(path)
    factory = instantiate(cfg.model)

    def score(lr: float) -> float:
        return validation_score(
            "learned",
            learned,
            pool,
            factory,
            inner_opt,
            instantiate(cfg.optim, lr=lr),
            lr=lr,
            seeds=[int(x) for x in record["seeds"]],
            steps=int(record["steps"]),
            batch_size=record.get("batch_size"),
            metric=str(record["metric"]),
        )

    tune_cfg = cfg.get("tune") or {}
    entry = tune_learned_lr(
        score, record, lr0, tune_cfg.get("lr_range"), int(tune_cfg.get("seed", 0))
    )
    log.info(
        "meta-test: the learned loss's inner lr tuned like the baselines (%d trials, %s): %.4g "
        "(default %.4g; %s %.4f vs %.4f)",
        entry["n_trials"],
        path,
        entry["lr"],
        lr0,
        record["metric"],
        entry["best_val"],
        entry["default_val"],
    )
    return {"source": f"{origin}, lr tuned like the baselines ({path})", **entry}


def _check_test_settings(cfg: DictConfig, task: Any) -> tuple[list[int], str]:
    """The test seeds and metric, refused before minutes of training rather than after."""
    seeds = list(range(int(cfg.meta_test.seeds)))
    metric = cfg.meta_test.metric or task.primary_metric
    if metric not in train_result_names(task.kind):
        raise ConfigError(
            f"meta_test.metric={metric!r} is not a metric of a {task.kind} task; "
            f"one of {train_result_names(task.kind)}"
        )
    if not seeds:
        raise ConfigError(f"meta_test.seeds must be at least 1, got {cfg.meta_test.seeds}")
    return seeds, metric


def _log_plan(cfg: DictConfig, losses: dict, lrs: dict, inner_opt: Any, n_seeds: int) -> None:
    shown = (
        f"lr={next(iter(lrs.values())):g}"
        if len(set(lrs.values())) == 1
        else ", ".join(f"{n} lr={v:g}" for n, v in lrs.items())
    )
    log.info(
        "meta-test: %s on %d seeds, %d steps of %s(%s)",
        ", ".join(losses),
        n_seeds,
        cfg.meta_test.steps,
        inner_opt.name,
        shown,
    )


def _default_lr_line(default: dict, metric: str) -> str:
    values = [v for v in default["results"][metric] if math.isfinite(v)]
    mean = sum(values) / len(values) if values else math.nan
    return (
        f"The learned loss at its default inner lr ({default['lr']:.4g}, before tuning): {metric} "
        f"{format_number(mean)} over {len(values)} of {len(default['results'][metric])} seeds "
        "(comparison.json: learned_at_default_lr); the verdict above is at its tuned lr."
    )


def _warn_short_tuning(settings: dict[str, dict], meta_training_steps: int) -> None:
    short = {
        n: s["tuning_steps"]
        for n, s in settings.items()
        if s["tuning_steps"] is not None and s["tuning_steps"] < meta_training_steps
    }
    if short:
        log.warning(
            "meta-test: baselines tuned with less compute than the learned loss's "
            "meta-training (%d inner steps): %s; for a matched budget tune with "
            "tune.budget_steps=meta",
            meta_training_steps,
            ", ".join(f"{n} {v}" for n, v in short.items()),
        )


def _train_all(
    cfg: DictConfig, pool: list, losses: dict, lrs: dict, inner_opt: Any, seeds: list[int]
) -> dict:
    """Every loss on every seed. One optimizer per learning rate (tuned baselines may each
    have their own); without meta_test.tuned every loss shares one."""
    tasks_for_seed = tasks_for_seed_fn(cfg, pool)
    results = {}
    for group_lr in dict.fromkeys(lrs.values()):
        group = {n: f for n, f in losses.items() if lrs[n] == group_lr}
        make_optimizer = functools.partial(
            inner_opt.torch_equivalent.func, **{**inner_opt.hparams, "lr": group_lr}
        )
        # the functional twin of the same optimizer (equal to it, tested): seeds x tasks in one vmap
        functional = (
            instantiate(cfg.optim, lr=group_lr) if cfg.meta_test.get("vectorise", True) else None
        )
        results.update(
            compare_losses(
                tasks_for_seed,
                instantiate(cfg.model),
                group,
                make_optimizer,
                seeds=seeds,
                steps=int(cfg.meta_test.steps),
                batch_size=cfg.meta_test.batch_size,
                progress=cfg.progress,
                vectorised=functional,
            )
        )
    return {n: results[n] for n in losses}


_SUMMARY_KEYS = (
    "p_value",
    "p_value_holm",
    "p_value_welch",
    "difference",
    "ci_low",
    "ci_high",
    "cohens_dz",
    "verdict",
    "best_baseline",
    "selected_on",
)


def write_comparison(record: dict, losses: dict, task: Any, out_dir: Path, logger: Any) -> None:
    """comparison.json first (nothing after it, plots or logging, may cost the numbers), then
    comparison.md, the plots and the logger's table and summary."""
    summary = summarize(record["results"])
    table, verdict = format_table(summary), format_verdict(record["significance"])
    write_json(out_dir / "comparison.json", record)
    (out_dir / "comparison.md").write_text(f"{table}\n\n{verdict}\n")
    print(f"\n{table}\n\n{verdict}\n", flush=True)
    comparison_figure(
        record["results"],
        out_dir / "comparison.png",
        significance=record.get("significance"),
        title=f"meta-test on {task.name}",
    )
    # a task with a loop of its own calls its losses its own way: no shape to draw
    drawable = {} if kinds.get(task.kind).own_loop else _plottable(losses, task)
    if drawable:
        plot_losses(
            drawable,
            task.kind,
            out_dir / "learned_vs_baselines.png",
            num_classes=task.num_classes,
            class_counts=task.class_counts,
            title=f"learned loss vs baselines ({task.name})",
        )
    logger.image("meta_test/comparison", out_dir / "comparison.png")
    rows = [
        [name, k, s["mean"], s["std"], s["n"], s["n_nan"]]
        for name, m in summary.items()
        for k, s in m.items()
    ]
    logger.table("meta_test/table", ["loss", "metric", "mean", "std", "n", "n_nan"], rows)
    logger.summary(
        {f"meta_test/{name}/{k}": s["mean"] for name, m in summary.items() for k, s in m.items()}
    )
    if "learned_at_default_lr" in record:  # the learned loss untuned, for the record
        default = record["learned_at_default_lr"]
        line = _default_lr_line(default, record["metric"])
        with open(out_dir / "comparison.md", "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
    if sig := record["significance"]:
        logger.summary({f"meta_test/{k}": sig[k] for k in _SUMMARY_KEYS})

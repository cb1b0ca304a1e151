"""Tuned baselines: each fixed loss's own hyper-parameters and the learning rate, chosen on
the validation split, so that a learned loss is compared with baselines at their best.

Why Optuna's own API and not ``hydra-optuna-sweeper``
-----------------------------------------------------
The sweeper (1.3.0, the last release for hydra-core 1.3) pins ``optuna < 3``: installing it
would hold this project on a four-year-old Optuna (5.0 installs here) and on its removed
APIs. It also makes every trial a Hydra job: a whole process start, config composition, data
generation and a run directory per trial, with one search space for a whole sweep, while here
every baseline needs its own space and the trial budget is computed from the training cost
(trials = budget // cost), which a sweeper's fixed ``n_trials`` cannot express. With the API,
one ``metaloss-tune`` run makes the data once and runs one ask/tell study per loss in
process, each trial training all its seeds as one ``vmap``.

How a trial is scored
---------------------
A trial trains fresh models with the candidate loss and learning rate exactly as the
meta-test will (same model, optimizer, steps and batch size, ``metatest.compare_losses``), on
the meta-training task(s) from ``tune.seeds`` initialisations that the meta-test never uses
(seeds ``TUNE_SEEDS + j``), and scores the mean of a *validation* metric over them (the test
split is never looked at). A trial in which any model diverges is told to Optuna as pruned,
so TPE treats its region as worse than every finished trial instead of ignoring it. The
first trial of every study is the loss's configured default (its YAML values and the
optimizer's lr), so the tuned choice is never worse than the default on validation.

Budget accounting
-----------------
The unit is one inner training step of one model (a forward and backward pass on one
minibatch). A trial costs ``steps × seeds × tasks`` of them. ``tune.budget_steps=N`` gives
each loss ``N // cost`` trials (refused if that is 0); ``tune.budget_steps=meta`` sets N to
what meta-training the learned loss costs in the same unit: offline
``meta.steps × meta.tasks_per_step × meta.inner_steps × candidates``, online
``meta.steps + ceil(meta.steps / meta.online_update_every) × meta.inner_steps × candidates``,
where ``candidates`` is 1 for a hypergradient, 2P for ES and λ for CMA-ES (every candidate
φ is a whole inner run). The hypergradient's own backward passes are not counted, so a
matched budget slightly favours the learned loss, never the baselines. Every loss gets the
whole budget (the learned loss got its meta-training).

Reproducibility: the sampler is ``TPESampler(seed=tune.seed)``, one fresh study per loss, so
a loss's result does not depend on which other losses are tuned or in what order.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from metaloss.cmaes import is_cmaes_target, population_size
from metaloss.gp import is_gp_target
from metaloss.metatest import compare_losses
from metaloss.runs import MAX_NESTING, nesting_depth
from metaloss.schema import (
    LOSS_RULES,
    boolean,
    int_list,
    integer,
    interval,
    mapping,
    one_of,
    positive,
    real,
    strings,
)

TUNED_FORMAT = "metaloss-tuned/1"
TUNE_SEEDS = (
    20_000  # meta-test seeds are 0..meta_test.seeds-1: tuning never sees their initialisations
)
LR_FACTOR = 10.0  # default lr range: log-uniform [lr / 10, lr * 10] around the optimizer's lr


@dataclass(frozen=True)
class Range:
    """A float search range; ``log``: sampled log-uniformly (needs ``low > 0``)."""

    low: float
    high: float
    log: bool = False


# One table per loss, keyed like schema.LOSS_RULES by the last part of the option's
# `_target_`; every range lies inside that rule's valid values (tested). Losses not listed
# (ce, mse, mae, weighted_ce, ...) have no continuous hyper-parameter worth searching: only
# their learning rate is tuned.
SEARCH_SPACES: dict[str, dict[str, Range]] = {
    "huber": {"delta": Range(0.1, 10.0, log=True)},
    "smooth_l1": {"beta": Range(0.1, 10.0, log=True)},
    "quantile": {"tau": Range(0.05, 0.95)},
    "label_smoothing": {"epsilon": Range(0.0, 0.3)},
    "focal": {"gamma": Range(0.0, 5.0)},
    "class_balanced_focal": {"gamma": Range(0.0, 5.0)},
    "poly1": {"epsilon": Range(-1.0, 3.0)},
    "gce": {"q": Range(0.1, 1.0)},
    "logit_adjusted_ce": {"tau": Range(0.0, 2.0)},
    "symmetric_ce": {"alpha": Range(0.01, 10.0, log=True), "beta": Range(0.01, 10.0, log=True)},
    "tversky": {"alpha": Range(0.1, 0.9), "beta": Range(0.1, 0.9)},
    "focal_tversky": {"alpha": Range(0.1, 0.9), "beta": Range(0.1, 0.9), "gamma": Range(0.5, 3.0)},
    "bce_dice": {"bce_weight": Range(0.1, 10.0, log=True)},
    "hinge": {"margin": Range(0.1, 10.0, log=True)},
    "squared_hinge": {"margin": Range(0.1, 10.0, log=True)},
    # pos_margin stays below every neg_margin (the loss refuses pos_margin >= neg_margin)
    "contrastive": {"pos_margin": Range(0.0, 0.7), "neg_margin": Range(0.75, 1.5)},
    "triplet": {"margin": Range(0.001, 0.5, log=True)},
    "multi_similarity": {
        "alpha": Range(0.5, 10.0, log=True),
        "beta": Range(5.0, 300.0, log=True),
        "base": Range(0.0, 0.95),
    },
    "prototype": {"temperature": Range(0.02, 0.5, log=True)},
}


class TunedFileError(ValueError):
    """A tuned.json that cannot be read, or does not fit the run that wants to use it."""


def space_for(target: str) -> dict[str, Range]:
    """The search space of a loss option's ``_target_`` (empty: tune the lr only)."""
    return SEARCH_SPACES.get(str(target).rsplit(".", 1)[-1], {})


def lr_range(lr: float, explicit: Any = None) -> Range:
    lo, hi = (
        (float(explicit[0]), float(explicit[1]))
        if explicit is not None
        else (lr / LR_FACTOR, lr * LR_FACTOR)
    )
    return Range(lo, hi, log=True)


def at_edge(
    values: Mapping[str, float | None], space: Mapping[str, Range], frac: float = 0.02
) -> list[str]:
    """The names whose tuned value lies within ``frac`` of its range's width (log width for a
    log range) of an edge: the optimum may lie outside the range searched."""
    out = []
    for k, r in space.items():
        value = values.get(k)
        if value is None:
            continue
        f = math.log if r.log else float
        lo, hi, v = f(r.low), f(r.high), f(float(value))
        if min(v - lo, hi - v) <= frac * (hi - lo):
            out.append(k)
    return out


def meta_training_steps(meta: Mapping, candidates: int = 1) -> int:
    """What meta-training the learned loss costs, in inner training steps of one model.
    ``candidates``: inner runs per task per outer step — 1 for a hypergradient, the 2P
    perturbed φ of ES, the λ of CMA-ES (:func:`candidates_per_step`)."""
    steps, k = int(meta["steps"]), int(meta["inner_steps"])
    if meta.get("mode", "offline") == "online":
        return steps + math.ceil(steps / int(meta.get("online_update_every", 1))) * k * candidates
    return steps * int(meta["tasks_per_step"]) * k * candidates


def candidates_per_step(meta_optim: Mapping, hypergrad: Mapping, n_params: int) -> int:
    """Inner runs per task per outer step: CMA-ES evaluates λ candidates (``popsize``, else
    cma's default 4 + ⌊3 ln n⌋ for n parameters), ES its 2P antithetic candidates, a
    hypergradient one run (whose backward pass is not counted)."""
    if is_cmaes_target(meta_optim.get("_target_")):
        return population_size(meta_optim.get("popsize"), n_params)
    if str(hypergrad.get("_target_", "")).rsplit(".", 1)[-1] == "EvolutionStrategies":
        return 2 * int(hypergrad.get("population", 1))
    return 1


def learned_loss_cost(cfg: Any, n_params: int) -> int:
    """What meta-training the learned loss of this run costs, in inner steps of one model
    (:func:`meta_training_steps` with every candidate counted); ``n_params``: φ's size."""

    def plain(node: Any) -> Mapping:
        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
        return dict(node)

    meta, meta_optim, hypergrad = plain(cfg.meta), plain(cfg.meta_optim), plain(cfg.hypergrad)
    if is_gp_target(meta_optim.get("_target_")):  # P trees per generation, then refinement
        gens = min(int(meta_optim.get("generations", 0)), int(meta["steps"]))
        search = meta_training_steps({**meta, "steps": gens}, int(meta_optim["popsize"]))
        refine = {**meta, "steps": int(meta["steps"]) - gens}
        return search + meta_training_steps(refine, candidates_per_step({}, hypergrad, n_params))
    return meta_training_steps(meta, candidates_per_step(meta_optim, hypergrad, n_params))


def setup_record(cfg: Any, tasks: int | None = None) -> dict[str, Any]:
    """Everything a baseline's training depends on besides the loss: the optimizer with all
    its hyper-parameters (``optim_config``, its lr apart as ``default_lr``: the meta-test's
    lr, the centre of the lr range and the lr of a loss tuned without one), the dtype, the
    model (and its sizes), the meta-test's training budget (steps, batch size) and the data
    — the whole task config, so values tuned on clean labels are refused for 40% label noise
    or another imbalance — and, when given, ``tasks``: how many tasks it trained on."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    assert isinstance(optim, dict)
    lr = cfg.meta_test.lr if cfg.meta_test.lr is not None else optim.get("lr")
    out = {
        "model": str(cfg.model._target_),
        "steps": int(cfg.meta_test.steps),
        "batch_size": cfg.meta_test.batch_size,
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
        "task_config": OmegaConf.to_container(cfg.task, resolve=True),
        "optim_config": {k: v for k, v in optim.items() if k != "lr"},
        "default_lr": float(lr) if lr is not None else None,
        "dtype": str(cfg.dtype),
    }
    if tasks is not None:
        out["tasks"] = int(tasks)
    return out


def trials_for_budget(budget_steps: int, cost_per_trial: int) -> int:
    """Trials a budget pays for; refuses a budget smaller than one trial."""
    if cost_per_trial < 1:
        raise ValueError(f"a trial must cost at least one step, got {cost_per_trial}")
    n = int(budget_steps) // int(cost_per_trial)
    if n < 1:
        raise ValueError(
            f"tune.budget_steps = {budget_steps} pays for no trial: one trial costs "
            f"{cost_per_trial} "
            "inner steps (steps x seeds x tasks); raise the budget or lower tune.seeds / the steps"
        )
    return n


@dataclass
class TuneResult:
    params: dict[str, float]
    lr: float | None
    best_val: float
    default_val: float
    n_trials: int
    n_diverged: int
    trials: list[dict[str, Any]]
    default_outside_range: bool = False
    resumed: int = 0  # finished trials found in the storage (0: a fresh study)


def trial_seed(seed: int, i: int) -> int:
    """The sampler's seed for the ``i``-th trial of a study: a fresh ``TPESampler`` per trial,
    so the trials depend only on ``tune.seed`` and the finished trials before them — a study
    resumed from its storage draws exactly what an uninterrupted one would have."""
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])


def _inside(v: float, r: Range) -> bool:
    return r.low <= v <= r.high


def tune_loss(
    score: Callable[[dict[str, float], float], float],
    space: Mapping[str, Range],
    defaults: Mapping[str, float],
    *,
    lr: float,
    lr_space: Range | None,
    n_trials: int,
    direction: str,
    seed: int,
    on_trial: Callable[[int, dict, float], None] | None = None,
    storage: Any = None,
    study_name: str = "loss",
) -> TuneResult:
    """One Optuna study (ask/tell, seeded TPE) over ``space`` (+ the lr unless ``lr_space`` is
    None). ``score(params, lr)`` trains and returns the validation value (NaN: diverged).

    Trial 0 is the default: ``defaults`` and ``lr``. When it lies inside the ranges it is the
    study's first trial; when it lies outside (say the optimizer's lr under ``tune.lr_range``)
    it is evaluated as it is, apart from the study (whose distributions cannot hold it), and
    counts as one of the ``n_trials``; either way ``default_val`` is the true default's value
    and the result is never worse than it on validation (the default itself wins otherwise).

    ``storage`` (an Optuna storage, e.g. a JournalStorage file): the study ``study_name`` is
    continued from it — its finished trials are kept, a trial that was running when the
    process died is marked failed and run again, the default's value is reused — so a killed
    tuning resumes, and a finished one costs no training at all."""
    try:
        import optuna
    except ImportError as e:  # imported here: an optional extra; reading tuned.json needs none
        raise ImportError("metaloss-tune needs Optuna: pip install 'metaloss[tune]'") from e
    from optuna.distributions import BaseDistribution, FloatDistribution
    from optuna.trial import TrialState

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists: dict[str, BaseDistribution] = {
        k: FloatDistribution(r.low, r.high, log=r.log) for k, r in space.items()
    }
    if lr_space is not None:
        dists["lr"] = FloatDistribution(lr_space.low, lr_space.high, log=True)
    default = {k: float(defaults.get(k, (r.low + r.high) / 2)) for k, r in space.items()}
    outside = not all(_inside(default[k], r) for k, r in space.items()) or (
        lr_space is not None and not _inside(float(lr), lr_space)
    )
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        load_if_exists=storage is not None,
        direction="maximize" if direction == "maximize" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=trial_seed(seed, 0)),
    )
    if study.direction.name.lower() != direction:
        raise TunedFileError(
            f"study {study_name!r} in the storage {direction!r} differs: it was made to "
            f"{study.direction.name.lower()}"
        )
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # its process died
        study.tell(stale.number, state=TrialState.FAIL)
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)

    def finished() -> list:
        return study.get_trials(deepcopy=False, states=finished_states)

    resumed = len(finished()) + ("default" in study.user_attrs)
    trials: list[dict[str, Any]] = []
    if outside:  # the true default, outside the distributions: evaluated apart, once
        if "default" not in study.user_attrs:
            value = float(score(dict(default), float(lr)))
            study.set_user_attr(
                "default",
                {
                    "params": default,
                    "lr": float(lr),
                    "value": value if math.isfinite(value) else None,
                },
            )
        d = study.user_attrs["default"]
        v = d.get("value") if isinstance(d, dict) else None
        if (
            not isinstance(d, dict)
            or d.get("params") != default
            or d.get("lr") != float(lr)
            or not (
                v is None
                or (isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v))
            )
        ):
            raise TunedFileError(
                f"study {study_name!r} in the storage holds a default trial {_show(d)}, not this "
                f"search's default ({_show({**default, 'lr': float(lr)})}): the storage was edited "
                "or made by other settings; move it away to start over"
            )
        trials.append({"params": dict(d["params"]), "lr": float(d["lr"]), "value": d["value"]})
        if on_trial is not None and not resumed:
            on_trial(
                0,
                {**default, **({"lr": float(lr)} if lr_space is not None else {})},
                math.nan if d["value"] is None else d["value"],
            )
    elif not finished() and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial({**default, **({"lr": float(lr)} if lr_space is not None else {})})
    in_study = int(n_trials) - len(trials)
    if not dists:  # nothing to tune (no hyper-parameters, lr fixed): one trial says it all
        in_study = 0 if outside else 1
    while len(finished()) < in_study:
        i = len(finished())
        study.sampler = optuna.samplers.TPESampler(seed=trial_seed(seed, i))
        trial = study.ask(dists)
        p = dict(trial.params)
        trial_lr = float(p.pop("lr")) if lr_space is not None else float(lr)
        value = float(score(p, trial_lr))
        if math.isfinite(value):
            study.tell(trial, value)
        else:  # diverged: worse than any finished trial for TPE (a failed trial would be ignored)
            study.tell(trial, state=TrialState.PRUNED)
        if on_trial is not None:
            on_trial(len(trials) + i, {**p, "lr": trial_lr}, value)
    done = sorted(finished(), key=lambda t: t.number)[: max(in_study, 0)]
    ranges = {**space, **({"lr": lr_space} if lr_space is not None else {})}
    for t in done:  # what a storage gives back is data too: every value inside what was searched
        bad = {
            k: v
            for k, v in t.params.items()
            if k not in ranges
            or not (isinstance(v, float | int) and math.isfinite(v) and _inside(v, ranges[k]))
        }
        no_value = t.state == TrialState.COMPLETE and (
            t.value is None or not math.isfinite(t.value)
        )
        if set(t.params) != set(ranges) or bad or no_value:
            searched = (
                ", ".join(f"{k} in [{r.low:g}, {r.high:g}]" for k, r in ranges.items())
                or "no parameters"
            )
            raise TunedFileError(
                f"study {study_name!r} in the storage holds trial {t.number} with params "
                f"{t.params} "
                f"and value {t.value}, not a trial of this search ({searched}): the storage was "
                "edited or made by other settings; move it away to start over"
            )
    for t in done:
        p = {k: float(v) for k, v in t.params.items() if k != "lr"}
        trials.append(
            {
                "params": p,
                "lr": float(t.params["lr"]) if lr_space is not None else float(lr),
                "value": float(t.value)
                if t.state == TrialState.COMPLETE and t.value is not None
                else None,
            }
        )
    scored = [t for t in trials if t["value"] is not None]
    if not scored:
        raise FloatingPointError(
            f"every one of the {len(trials)} trials diverged; narrow tune.lr_range"
        )
    pick = max if direction == "maximize" else min
    best = pick(
        scored, key=lambda t: t["value"]
    )  # the first of equal values: the default wins a tie
    default_val = trials[0]["value"]
    return TuneResult(
        params=dict(best["params"]),
        lr=best["lr"] if lr_space is not None else None,
        best_val=float(best["value"]),
        default_val=math.nan if default_val is None else default_val,
        n_trials=len(trials),
        n_diverged=sum(t["value"] is None for t in trials),
        trials=trials,
        default_outside_range=outside,
        resumed=resumed,
    )


# ---------------------------------------------------------------- reading tuned.json
#
# tuned.json is data: values checked here, never instantiated. Nothing in it names code that
# is called: a loss's hyper-parameters are merged over the loss's *own* option (whose
# `_target_` comes from the run's config), ``target`` is only compared with that option's, and
# ``model_config`` / ``task_config`` / ``optim_config`` are only compared, key by key, with
# the run's own config (any `_target_` in them can only equal the run's own). A loss's
# hyper-parameter must be one that metaloss-tune searches for that function (SEARCH_SPACES)
# and a valid value by the loss's own rule (metaloss.schema.LOSS_RULES: the single table of
# valid values).


def validation_score(
    name: str,
    loss: Any,
    pool: list,
    factory: Any,
    inner_opt: Any,
    functional: Any,
    *,
    lr: float,
    seeds: list[int],
    steps: int,
    batch_size: Any,
    metric: str,
) -> float:
    """One tuning trial: ``loss`` trained at inner lr ``lr`` (``inner_opt``'s torch twin;
    ``functional``: the functional optimizer at that lr, all seeds in one ``vmap``) from each
    of ``seeds`` on every task of ``pool``; the mean of the validation ``metric`` (NaN if any
    seed diverged). Baselines (metaloss-tune) and the learned loss (:func:`tune_learned_lr`)
    are scored by this one function."""
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
        vectorised=functional,
    )
    values = results[name][metric]
    return float(sum(values) / len(values)) if all(math.isfinite(v) for v in values) else math.nan


def learned_tuning_problems(record: Mapping[str, Any]) -> list[str]:
    """Why the learned loss's lr cannot be tuned as the baselines of ``record`` were: the
    budget, direction, seeds, steps and metric it must copy are missing, or the baselines'
    own lr was not tuned (``tune.lr=false``: tuning the learned loss's alone would be unfair
    to them)."""
    budget = record.get("budget") or {}
    missing = [k for k in ("n_trials", "cost_per_trial") if k not in budget]
    missing += [k for k in ("direction", "seeds", "steps", "metric") if k not in record]
    out = [f"{record.get('path', 'tuned.json')} has no {', '.join(missing)}"] if missing else []
    entries = (record.get("losses") or {}).values()
    if (
        "lr_range" in budget
        and budget["lr_range"] is None
        or (entries and all(e.get("lr") is None for e in entries))
    ):
        out.append("its baselines were tuned without their lr (tune.lr=false)")
    return out


def tune_learned_lr(
    score: Callable[[float], float], record: Mapping[str, Any], lr0: float, lr_span: Any, seed: int
) -> dict[str, Any]:
    """The learned loss's inner lr tuned as each baseline of ``record`` (a tuned.json) was:
    the same Optuna study (seeded TPE, trial 0 at the default ``lr0``), the same number of
    trials, and ``score(lr)`` training on the same seeds, steps and validation metric. Fair in
    both directions: the baselines' tuning no longer buys them an edge the learned loss lacks.
    The lr range and sampler seed are the tuned.json's (``budget.lr_range``,
    ``budget.sampler_seed``); a file from before they were recorded falls back to ``lr_span``
    (``tune.lr_range``; None: [lr0 / 10, lr0 * 10]) and ``seed`` (``tune.seed``)."""
    budget = record["budget"]
    n_trials = int(budget["n_trials"])
    span = budget.get("lr_range", lr_span)  # as the baselines were searched, when recorded
    result = tune_loss(
        lambda params, lr: score(lr),
        {},
        {},
        lr=lr0,
        lr_space=lr_range(lr0, span),
        n_trials=n_trials,
        direction=str(record["direction"]),
        seed=int(budget.get("sampler_seed", seed)),
        study_name="learned",
    )
    return {
        "lr": float(result.lr if result.lr is not None else lr0),
        "default_lr": lr0,
        "best_val": result.best_val,
        "default_val": result.default_val,
        "n_trials": result.n_trials,
        "n_diverged": result.n_diverged,
        "tuning_steps": result.n_trials * int(record["budget"]["cost_per_trial"]),
    }


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def _val_metric(v: Any) -> str | None:
    return (
        None
        if isinstance(v, str) and v.startswith("val/")
        else "val/<metric> (tuning never looks at the test split)"
    )


def _top_level_schema() -> dict[str, Callable[[Any], str | None]]:
    return {
        "format": one_of(TUNED_FORMAT),
        "task": _text,
        "optim": _text,
        "optim_config": mapping(),
        "dtype": one_of("float32", "float64"),
        "model": _text,
        "steps": integer(1),
        "batch_size": integer(1, optional=True),
        "model_config": mapping(),
        "task_config": mapping(),
        "metric": _val_metric,
        "direction": one_of("maximize", "minimize"),
        "seeds": int_list(0, nonempty=True),
        "tasks": integer(1),
        "default_lr": positive(),
        "sampler": _text,
        "budget": mapping(),
        "complete": boolean(),
        "losses": mapping(),
    }


def _budget_schema() -> dict[str, Callable[[Any], str | None]]:
    return {
        "budget_steps": integer(1, optional=True),
        "cost_per_trial": integer(1),
        "n_trials": integer(1),
        "steps_used": integer(0),
        # how each baseline's lr was searched (None: not tuned), and the sampler's seed: the
        # learned loss's lr is then searched the same way (meta_test.tune_learned_lr)
        "lr_range": _optional_lr_range,
        "sampler_seed": integer(0, optional=True),
    }


def _optional_lr_range(v: Any) -> str | None:
    if v is None:
        return None
    return interval(strict=True, lo=0.0, lo_open=True)(v)


def _entry_schema() -> dict[str, Callable[[Any], str | None]]:
    return {
        "target": _text,
        "params": mapping(),
        "lr": positive(optional=True),
        "best_val": real(optional=True),
        "default_val": real(optional=True),
        "default_params": mapping(),
        "default_outside_range": boolean(),
        "n_trials": integer(1),
        "n_diverged": integer(0),
        "steps_used": integer(0),
        "at_edge": strings(),
        "trials": lambda v: None if isinstance(v, list) else "a list of trials",
    }


REQUIRED_TOP_LEVEL = ("format", "task", "optim", "losses")
REQUIRED_ENTRY = ("target", "params")


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 120 else r[:117] + "..."


def _code_key(k: Any) -> bool:
    """A Hydra instantiation key (``_target_``, ``_partial_``, ``_args_``, ...): names code."""
    return isinstance(k, str) and k.startswith("_") and k.endswith("_")


def _check_keys(
    node: dict,
    schema: Mapping[str, Callable[[Any], str | None]],
    where: str,
    required: tuple[str, ...] = (),
) -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{where}.{k}" if where else str(k)
        if _code_key(k):
            out.append(f"{key}: tuned.json holds values only, never code to call; {k!r} is refused")
        elif k not in schema:
            out.append(f"{key}: unknown key (known: {', '.join(schema)})")
        else:
            msg = schema[k](v)
            if msg:
                out.append(f"{key} = {_show(v)}: must be {msg}")
    for k in required:
        if k not in node:
            out.append(f"{where + '.' if where else ''}{k}: missing")
    return out


def loss_param_problems(target: str, params: Any, where: str) -> list[str]:
    """A loss's tuned hyper-parameters: names that metaloss-tune searches for ``target``
    (:data:`SEARCH_SPACES`), finite real numbers (no bool), valid by the loss's own rule
    (:data:`metaloss.schema.LOSS_RULES`)."""
    if not isinstance(params, dict):
        return [f"{where} = {_show(params)}: must be a mapping {{hyper-parameter: number}}"]
    fn = str(target).rsplit(".", 1)[-1]
    space, rules, finite = space_for(target), LOSS_RULES.get(fn, {}), real()
    out = []
    for k, v in params.items():
        key = f"{where}.{k}"
        if _code_key(k):
            out.append(f"{key}: tuned.json holds values only, never code to call; {k!r} is refused")
        elif k not in space:
            out.append(
                f"{key}: not a tuned hyper-parameter of {fn} (it has "
                f"{', '.join(space) if space else 'none: only its learning rate is tuned'})"
            )
        else:
            msg = (
                rules[k](v) if k in rules else finite(v)
            )  # every rule of a searched value refuses bool, NaN, inf
            if msg:
                out.append(f"{key} = {_show(v)}: must be {msg} (the valid values of {fn}'s {k})")
    return out


def tuned_problems(data: Any) -> list[str]:
    """Every way ``data`` (a parsed tuned.json) is not a tuned.json: unknown or code-naming
    keys, wrong types, non-finite, boolean or out-of-range values, as ``key = value: must be``."""
    if not isinstance(data, dict):
        return [f"the file holds a {type(data).__name__}, not a mapping"]
    out = _check_keys(data, _top_level_schema(), "", REQUIRED_TOP_LEVEL)
    if isinstance(data.get("budget"), dict):
        out += _check_keys(data["budget"], _budget_schema(), "budget")
    for name, entry in (
        (data.get("losses") or {}).items() if isinstance(data.get("losses"), dict) else ()
    ):
        where = f"losses.{name}"
        if not isinstance(entry, dict):
            out.append(f"{where} = {_show(entry)}: must be a mapping (target, params, lr, ...)")
            continue
        out += _check_keys(entry, _entry_schema(), where, REQUIRED_ENTRY)
        target = entry.get("target")
        if isinstance(target, str) and isinstance(entry.get("params"), dict):
            out += loss_param_problems(target, entry["params"], f"{where}.params")
        for k, v in (
            (entry.get("default_params") or {}).items()
            if isinstance(entry.get("default_params"), dict)
            else ()
        ):
            if _code_key(k) or real()(v):
                out.append(f"{where}.default_params.{k} = {_show(v)}: must be a finite number")
        for i, t in (
            enumerate(entry.get("trials") or []) if isinstance(entry.get("trials"), list) else ()
        ):
            out += (
                _check_keys(
                    t,
                    {"params": mapping(), "lr": positive(), "value": real(optional=True)},
                    f"{where}.trials[{i}]",
                )
                if isinstance(t, dict)
                else [f"{where}.trials[{i}] = {_show(t)}: must be a mapping (params, lr, value)"]
            )
            if (
                isinstance(t, dict)
                and isinstance(t.get("params"), dict)
                and isinstance(target, str)
            ):
                out += loss_param_problems(target, t["params"], f"{where}.trials[{i}].params")
    return out


def load_tuned(path: str | Path) -> dict[str, Any]:
    """A tuned.json written by ``metaloss-tune``, checked as data (:func:`tuned_problems`),
    not yet for the run (:func:`tuned_for`). Refuses the whole file, naming every bad key."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tuned.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested past json's depth
        hint = (
            (
                f" (a relative path is read from the current directory, {Path.cwd()}: the recorded "
                "experiments' tuned.json are found from the repository root)"
            )
            if not p.is_absolute()
            else ""
        )
        raise TunedFileError(f"cannot read tuned baselines from {p}: {e}{hint}") from e
    if nesting_depth(data) > MAX_NESTING:
        raise TunedFileError(
            f"{p} is nested deeper than {MAX_NESTING} levels, which no tuned.json is"
        )
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT:
        raise TunedFileError(
            f"{p} is not a tuned.json of format {TUNED_FORMAT} (written by metaloss-tune)"
        )
    found = tuned_problems(data)
    if found:
        raise TunedFileError(
            f"{p} is not a valid tuned.json (nothing was run):\n  " + "\n  ".join(found)
        )
    data["path"] = str(p)
    return data


def _differences(key: str, there: Any, here: Any) -> dict[str, tuple[Any, Any]]:
    """Leaf-by-leaf differences of two JSON-like values, keyed by dotted path."""
    if isinstance(there, dict) and isinstance(here, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(there) | set(here), key=str):
            out.update(_differences(f"{key}.{k}", there.get(k), here.get(k)))
        return out
    if isinstance(there, list | tuple) and isinstance(here, list | tuple):
        there, here = list(there), list(here)
    return {} if there == here else {key: (there, here)}


def tuned_for(
    tuned: Mapping[str, Any],
    names: list[str],
    *,
    task: str,
    optim: str,
    targets: Mapping[str, str],
    setup: Mapping[str, Any] | None = None,
    test_seeds: int | None = None,
    test_metric: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The tuned entries of the ``compare:`` losses, refusing a file tuned for another task
    or optimizer, another training setup (``setup``: :func:`setup_record` of this run, every
    key of which the file must record and equal), a loss it lacks, a loss whose option now
    names another function (a tuned lr and γ mean nothing elsewhere), or tuning seeds among
    the meta-test's ``0 .. test_seeds - 1``, or tuned on another metric than the meta-test's
    ``test_metric`` (its validation twin: a baseline tuned for accuracy is not at its best on
    balanced accuracy). ``targets``: name -> the option's ``_target_``."""
    where = tuned.get("path", "tuned.json")
    if tuned.get("task") != task:
        raise TunedFileError(
            f"{where} was tuned on task {tuned.get('task')!r}, this run's task is {task!r}"
        )
    if tuned.get("optim") != optim:
        raise TunedFileError(
            f"{where} tuned learning rates for optimizer {tuned.get('optim')!r}, this run "
            f"uses {optim!r}"
        )
    # a learning rate tuned for another model, budget or batch size means nothing here; a file
    # that does not say what it was tuned with (an older metaloss-tune) cannot be checked
    unknown = [k for k in (setup or {}) if k not in tuned]
    if unknown:
        raise TunedFileError(
            f"{where} does not record {', '.join(unknown)} (written by an older metaloss-tune), "
            "so it cannot be checked against this run: tune again"
        )
    differ = {
        key: ab
        for k, v in (setup or {}).items()
        for key, ab in _differences(k, tuned.get(k), v).items()
    }
    if differ:
        raise TunedFileError(
            f"{where} was tuned with other training settings: "
            + "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())
        )
    if test_seeds is not None:
        shared = sorted(set(tuned.get("seeds") or ()) & set(range(int(test_seeds))))
        if shared:
            raise TunedFileError(
                f"{where} was tuned from seeds {shared[:5]}{'...' if len(shared) > 5 else ''}, "
                f"which the meta-test uses too (meta_test.seeds = {test_seeds}: seeds 0.."
                f"{int(test_seeds) - 1}): tuning must never see the test initialisations"
            )
    if (
        test_metric is not None
        and tuned.get("metric") != "val/" + str(test_metric).split("/", 1)[-1]
    ):
        raise TunedFileError(
            f"{where} was tuned on {tuned.get('metric')!r}, but this meta-test compares on "
            f"{test_metric!r}: the baselines were not tuned for the metric they are judged on "
            f"(tune again with tune.metric=val/{str(test_metric).split('/', 1)[-1]}, or set "
            "meta_test.metric to the tuned one)"
        )
    missing = [n for n in names if n not in tuned["losses"]]
    if missing:
        raise TunedFileError(
            f"{where} has no tuned values for {', '.join(missing)} (it has "
            f"{', '.join(tuned['losses'])}); tune them too, or leave them out of compare:"
        )
    out = {}
    for n in names:
        entry = tuned["losses"][n]
        if entry.get("target") != targets[n]:
            raise TunedFileError(
                f"{where}: {n!r} was tuned as {entry.get('target')}, but loss {n!r} is now "
                f"{targets[n]}"
            )
        problems = loss_param_problems(targets[n], entry.get("params"), f"losses.{n}.params")
        if (
            problems
        ):  # load_tuned checked them against the recorded target; the same here, to be sure
            raise TunedFileError(f"{where}: " + "; ".join(problems))
        out[n] = entry
    return out

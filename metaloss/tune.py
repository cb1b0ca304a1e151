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
matched budget slightly favours the learned loss, never the baselines. Every loss gets the whole budget (the learned loss
got its meta-training).

Reproducibility: the sampler is ``TPESampler(seed=tune.seed)``, one fresh study per loss, so
a loss's result does not depend on which other losses are tuned or in what order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUNED_FORMAT = "metaloss-tuned/1"
TUNE_SEEDS = 20_000  # meta-test seeds are 0..meta_test.seeds-1: tuning never sees their initialisations
LR_FACTOR = 10.0     # default lr range: log-uniform [lr / 10, lr * 10] around the optimizer's lr


@dataclass(frozen=True)
class Range:
    """A float search range; ``log``: sampled log-uniformly (needs ``low > 0``)."""
    low: float
    high: float
    log: bool = False


# One table per loss, keyed like validate.LOSS_RULES by the last part of the option's
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
}


class TunedFileError(ValueError):
    """A tuned.json that cannot be read, or does not fit the run that wants to use it."""


def space_for(target: str) -> dict[str, Range]:
    """The search space of a loss option's ``_target_`` (empty: tune the lr only)."""
    return SEARCH_SPACES.get(str(target).rsplit(".", 1)[-1], {})


def lr_range(lr: float, explicit: Any = None) -> Range:
    lo, hi = (float(explicit[0]), float(explicit[1])) if explicit is not None else (lr / LR_FACTOR, lr * LR_FACTOR)
    return Range(lo, hi, log=True)


def at_edge(values: Mapping[str, float | None], space: Mapping[str, Range], frac: float = 0.02) -> list[str]:
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
    from metaloss.cmaes import is_cmaes_target, population_size

    if is_cmaes_target(meta_optim.get("_target_")):
        return population_size(meta_optim.get("popsize"), n_params)
    if str(hypergrad.get("_target_", "")).rsplit(".", 1)[-1] == "EvolutionStrategies":
        return 2 * int(hypergrad.get("population", 1))
    return 1


def learned_loss_cost(cfg: Any, n_params: int) -> int:
    """What meta-training the learned loss of this run costs, in inner steps of one model
    (:func:`meta_training_steps` with every candidate counted); ``n_params``: φ's size."""
    from omegaconf import OmegaConf

    def plain(node: Any) -> Mapping:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)  # type: ignore[return-value]

    return meta_training_steps(plain(cfg.meta), candidates_per_step(plain(cfg.meta_optim), plain(cfg.hypergrad),
                                                                     n_params))


def setup_record(cfg: Any) -> dict[str, Any]:
    """What a tuned learning rate and γ depend on besides the loss and optimizer: the model
    (and its sizes), the meta-test's training budget, and the data — the whole task config,
    so values tuned on clean labels are refused for 40% label noise or another imbalance."""
    from omegaconf import OmegaConf

    return {"model": str(cfg.model._target_), "steps": int(cfg.meta_test.steps),
            "batch_size": cfg.meta_test.batch_size,
            "model_config": OmegaConf.to_container(cfg.model, resolve=True),
            "task_config": OmegaConf.to_container(cfg.task, resolve=True)}


def trials_for_budget(budget_steps: int, cost_per_trial: int) -> int:
    """Trials a budget pays for; refuses a budget smaller than one trial."""
    if cost_per_trial < 1:
        raise ValueError(f"a trial must cost at least one step, got {cost_per_trial}")
    n = int(budget_steps) // int(cost_per_trial)
    if n < 1:
        raise ValueError(f"tune.budget_steps = {budget_steps} pays for no trial: one trial costs {cost_per_trial} "
                         "inner steps (steps x seeds x tasks); raise the budget or lower tune.seeds / the steps")
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


def tune_loss(score: Callable[[dict[str, float], float], float], space: Mapping[str, Range],
              defaults: Mapping[str, float], *, lr: float, lr_space: Range | None, n_trials: int,
              direction: str, seed: int, on_trial: Callable[[int, dict, float], None] | None = None
              ) -> TuneResult:
    """One Optuna study (ask/tell, seeded TPE) over ``space`` (+ the lr unless ``lr_space`` is
    None). ``score(params, lr)`` trains and returns the validation value (NaN: diverged). Trial
    0 is the default (``defaults`` clipped to the ranges, ``lr``)."""
    try:
        import optuna
    except ImportError as e:  # an optional extra: the meta-test reads tuned.json without it
        raise ImportError("metaloss-tune needs Optuna: pip install 'metaloss[tune]'") from e
    from optuna.distributions import BaseDistribution, FloatDistribution
    from optuna.trial import TrialState

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists: dict[str, BaseDistribution] = {k: FloatDistribution(r.low, r.high, log=r.log) for k, r in space.items()}
    if lr_space is not None:
        dists["lr"] = FloatDistribution(lr_space.low, lr_space.high, log=True)
    first = {k: min(max(float(defaults.get(k, (r.low + r.high) / 2)), r.low), r.high) for k, r in space.items()}
    if lr_space is not None:
        first["lr"] = min(max(float(lr), lr_space.low), lr_space.high)
    study = optuna.create_study(direction="maximize" if direction == "maximize" else "minimize", sampler=optuna.samplers.TPESampler(seed=int(seed)))
    study.enqueue_trial(first)
    trials: list[dict[str, Any]] = []
    if not dists:  # nothing to tune (no hyper-parameters, lr fixed): one trial says it all
        n_trials = 1
    for i in range(int(n_trials)):
        trial = study.ask(dists)
        p = dict(trial.params)
        trial_lr = float(p.pop("lr")) if lr_space is not None else float(lr)
        value = float(score(p, trial_lr))
        if math.isfinite(value):
            study.tell(trial, value)
        else:  # diverged: worse than any finished trial for TPE (a failed trial would be ignored)
            study.tell(trial, state=TrialState.PRUNED)
        trials.append({"params": p, "lr": trial_lr, "value": value if math.isfinite(value) else None})
        if on_trial is not None:
            on_trial(i, {**p, "lr": trial_lr}, value)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise FloatingPointError(f"every one of the {n_trials} trials diverged; narrow tune.lr_range")
    best = study.best_trial
    assert best.value is not None  # a COMPLETE trial has its value
    params = {k: float(v) for k, v in best.params.items() if k != "lr"}
    default_val = trials[0]["value"]
    return TuneResult(params=params, lr=float(best.params["lr"]) if lr_space is not None else None,
                      best_val=float(best.value), default_val=math.nan if default_val is None else default_val,
                      n_trials=len(trials), n_diverged=sum(t["value"] is None for t in trials), trials=trials)


# ---------------------------------------------------------------- reading tuned.json


def load_tuned(path: str | Path) -> dict[str, Any]:
    """A tuned.json written by ``metaloss-tune``, checked for shape (not yet for the run)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tuned.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        hint = (f" (a relative path is read from the current directory, {Path.cwd()}: the recorded "
                "experiments' tuned.json are found from the repository root)") if not p.is_absolute() else ""
        raise TunedFileError(f"cannot read tuned baselines from {p}: {e}{hint}") from e
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT or not isinstance(data.get("losses"), dict):
        raise TunedFileError(f"{p} is not a tuned.json of format {TUNED_FORMAT} (written by metaloss-tune)")
    for name, entry in data["losses"].items():
        lr = entry.get("lr") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("params"), dict)
                or not (lr is None or (isinstance(lr, int | float) and lr > 0))):
            raise TunedFileError(f"{p}: entry {name!r} has no params mapping or a bad lr")
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


def tuned_for(tuned: Mapping[str, Any], names: list[str], *, task: str, optim: str,
              targets: Mapping[str, str], setup: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The tuned entries of the ``compare:`` losses, refusing a file tuned for another task
    or optimizer, a loss it lacks, or a loss whose option now names another function (a
    tuned lr and γ mean nothing elsewhere). ``targets``: name -> the option's ``_target_``."""
    where = tuned.get("path", "tuned.json")
    if tuned.get("task") != task:
        raise TunedFileError(f"{where} was tuned on task {tuned.get('task')!r}, this run's task is {task!r}")
    if tuned.get("optim") != optim:
        raise TunedFileError(f"{where} tuned learning rates for optimizer {tuned.get('optim')!r}, this run "
                             f"uses {optim!r}")
    # a learning rate tuned for another model, budget or batch size means nothing here; a file
    # that does not say what it was tuned with (an older metaloss-tune) cannot be checked
    unknown = [k for k in (setup or {}) if k not in tuned]
    if unknown:
        raise TunedFileError(f"{where} does not record {', '.join(unknown)} (written by an older metaloss-tune), "
                             "so it cannot be checked against this run: tune again")
    differ = {key: ab for k, v in (setup or {}).items()
              for key, ab in _differences(k, tuned.get(k), v).items()}
    if differ:
        raise TunedFileError(f"{where} was tuned with other training settings: "
                             + "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    missing = [n for n in names if n not in tuned["losses"]]
    if missing:
        raise TunedFileError(f"{where} has no tuned values for {', '.join(missing)} (it has "
                             f"{', '.join(tuned['losses'])}); tune them too, or leave them out of compare:")
    out = {}
    for n in names:
        entry = tuned["losses"][n]
        if entry.get("target") is not None and entry["target"] != targets[n]:
            raise TunedFileError(f"{where}: {n!r} was tuned as {entry['target']}, but loss {n!r} is now "
                                 f"{targets[n]}")
        out[n] = entry
    return out

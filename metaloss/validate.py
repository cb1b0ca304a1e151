"""Every setting checked for type and range in one place, before any data or compute.

Each entry point calls :func:`check_config` first thing: a typo such as
``train.batch_size=-4`` (which used to hang), ``meta.clip_grad_norm=-1`` (silently
gradient *ascent*) or a bad ``meta_test.*`` value (which used to fail only after
meta-training) is refused at once, with every problem listed and each message naming
the key, the value and the valid range.

Rules are keyed by dotted config paths (``fnmatch`` patterns, so ``*optim.lr`` covers
``optim``, ``optim`` and ``meta_optim``); a rule for a key that the composed
config does not have is skipped. Loss hyper-parameters are checked per loss function
(``LOSS_RULES``, in :mod:`metaloss.schema` with the plain value checkers, which
:mod:`metaloss.tune` shares), since ``epsilon`` means different things for label smoothing
and Poly-1.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from metaloss.cmaes import KINDS as cmaes_kinds
from metaloss.cmaes import config_problems as cmaes_problems
from metaloss.config import group_options, using_searchpath
from metaloss.errors import ConfigError  # also metaloss.validate.ConfigError, for the apps
from metaloss.gp import config_problems as gp_problems
from metaloss.hypergrad.es import KINDS as es_kinds
from metaloss.losses.symbolic import ExpressionError, shape_problem
from metaloss.losses.symbolic import parse as parse_expression
from metaloss.metrics import HIGHER_IS_BETTER, metric_names, train_result_names
from metaloss.runtime import DEVICE_PATTERN
from metaloss.schema import (
    LOSS_RULES,
    Check,
    boolean,
    classes,
    existing_path,
    int_list,
    integer,
    interval,
    is_int,
    is_real,
    learned_loss_source,
    mapping,
    one_of,
    positive,
    real,
    strings,
    text,
    unit_pair,
)
from metaloss.tasks.base import meta_test_draws
from metaloss.tasks.tabular import KINDS as TABULAR_KINDS
from metaloss.tasks.tabular import SKLEARN as SKLEARN_SETS
from metaloss.tune import TunedFileError, load_tuned

# ---------------------------------------------------------------- value checkers


def tabular_source() -> Check:
    """``sklearn:<bundled name>`` or an existing .csv / .npz file (read later, when the task
    is built, which checks its contents)."""

    def check(v: Any) -> str | None:
        if isinstance(v, str) and v.startswith("sklearn:"):
            return (
                None
                if v[8:] in SKLEARN_SETS
                else "one of " + ", ".join(f"sklearn:{n}" for n in SKLEARN_SETS)
            )
        ok = isinstance(v, str) and v.lower().endswith((".csv", ".npz"))
        if ok and Path(v).expanduser().is_file():
            return None
        return "sklearn:<name> or an existing .csv / .npz file"

    return check


# The plain ones (integer, real, one_of, ...) are metaloss.schema's; these need the run's
# config sources, the metrics, or tuned.json.


def _named_losses() -> list[str]:
    """Losses a name alone can build (``learned`` needs a file path: use loss=learned): the
    ``loss`` options of every config source of the run (conf/ and ``hydra.searchpath``, see
    :func:`metaloss.config.searchpath`; :func:`problems` sets the checked config's)."""
    return [n for n in group_options("loss") if n != "learned"]


_LOSS_SOURCES = "conf/loss or a loss/ folder on hydra.searchpath"


def loss_name(optional: bool = False) -> Check:
    def check(v):
        valid = _named_losses()
        if (v is None and optional) or v in valid:
            return None
        return (
            f"a loss from {_LOSS_SOURCES}: " + ", ".join(valid) + (" or null" if optional else "")
        )

    return check


def loss_names() -> Check:
    def check(v):
        if v is None:
            return None
        valid = _named_losses()
        if not isinstance(v, list | tuple) or not v or any(x not in valid for x in v):
            return f"null or a non-empty list of losses from {_LOSS_SOURCES}: " + ", ".join(valid)
        if len(set(v)) != len(v):
            return "a list without repeated losses"
        return None

    return check


def metric_name() -> Check:
    def check(v):
        if v is None:
            return None
        if isinstance(v, str) and "/" in v:
            split, name = v.split("/", 1)
            if split in ("train", "val", "test") and (name in HIGHER_IS_BETTER):
                return None
        return "null or <split>/<metric> with split train|val|test and metric one of " + ", ".join(
            HIGHER_IS_BETTER
        )

    return check


def tuned_file() -> Check:
    """``meta_test.tuned``: null or a tuned.json written by metaloss-tune (or its run dir)."""

    def check(v):
        if v is None:
            return None
        if not isinstance(v, str):
            return "null or the path of a tuned.json written by metaloss-tune"
        try:
            load_tuned(v)
        except TunedFileError as e:
            return f"null or a tuned.json written by metaloss-tune ({e})"
        return None

    return check


def budget_steps() -> Check:
    def check(v):
        if v is None or v == "meta" or (is_int(v) and v >= 1):
            return None
        return (
            "null, an integer >= 1 (inner training steps per loss) or meta (the learned loss's "
            "meta-training cost)"
        )

    return check


def val_metric() -> Check:
    inner = metric_name()
    return lambda v: (
        None
        if v is None or (not inner(v) and v.startswith("val/"))
        else (
            "null or val/<metric> (tuning never looks at the test split), metric one of "
            + ", ".join(HIGHER_IS_BETTER)
        )
    )


# ---------------------------------------------------------------- the rules

RULES: dict[str, Check] = {
    # shared
    "seed": integer(0),
    "progress": boolean(),
    "device": lambda v: (
        None if isinstance(v, str) and DEVICE_PATTERN.match(v) else "auto, cpu, cuda or cuda:N"
    ),
    "dtype": one_of("float32", "float64"),
    "threads": integer(1),
    "metric": metric_name(),
    "allow_other_task": boolean(),  # metaloss-eval: a learned loss on a task other than its file's
    "trusted_modules": lambda v: (
        None
        if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)
        else "a list of module names"
    ),
    # metaloss-train
    "seeds": integer(1),
    "train.steps": integer(1),
    "train.batch_size": integer(1, optional=True),
    "train.eval_every": integer(0),
    # metaloss-meta
    "meta.mode": one_of("offline", "online"),
    "meta.steps": integer(1),
    "meta.tasks_per_step": integer(1, 100_000),
    "meta.inner_steps": integer(1, 1_000_000),
    "meta.inner_batch": integer(1, optional=True),
    "meta.val_batch": integer(1, optional=True),
    "meta.val_from_train": boolean(),
    "meta.selection.frac": real(0, 1, hi_open=True),
    "meta.selection.every": integer(1),
    "meta.selection.seeds": integer(1, 10_000),
    "meta.selection.margin": real(0),
    "meta.train_tasks": integer(1, 100_000),
    "meta.objective": loss_name(optional=True),
    "meta.clip_grad_norm": positive(optional=True),
    "meta.learn_inner_lr": boolean(),
    "meta.online_update_every": integer(1),
    "meta.plot_every": integer(1),
    "meta.checkpoint_every": integer(1),
    "meta.resume_from": existing_path(optional=True),
    "meta.max_bad_steps": integer(1),
    "compare": loss_names(),
    "meta_test.enabled": boolean(),
    "meta_test.seeds": integer(1, 10_000),
    "meta_test.steps": integer(1),
    "meta_test.batch_size": integer(1, optional=True),
    "meta_test.tasks_per_seed": integer(1, 10_000),
    "meta_test.task_overrides": mapping(),
    "meta_test.lr": positive(optional=True),
    "meta_test.metric": metric_name(),
    "meta_test.alpha": real(0, 1, lo_open=True, hi_open=True),
    "meta_test.vectorise": boolean(),
    "meta_test.fresh_draws": boolean(),
    "meta_test.horizon_note": text(optional=True),
    "meta_test.tuned": tuned_file(),
    "meta_test.tune_learned_lr": boolean(),
    # metaloss-tune
    "tune.n_trials": integer(1, 100_000, optional=True),
    "tune.budget_steps": budget_steps(),
    "tune.seeds": integer(1, 10_000),
    "tune.steps": integer(1, optional=True),
    "tune.metric": val_metric(),
    "tune.seed": integer(0),
    "tune.lr": boolean(),
    "tune.lr_range": lambda v: None if v is None else interval(strict=True, lo=0, lo_open=True)(v),
    # metaloss-eval
    "loss_path": learned_loss_source(),
    # metaloss-fewshot
    "maml.steps": integer(1, 1000),
    "maml.inner_lr": positive(),
    "maml.first_order": boolean(),
    "fewshot.meta_steps": integer(1, 999_999),  # meta-batch streams of two seeds never meet
    "fewshot.meta_batch": integer(1, 100_000),
    "fewshot.lr": positive(),
    "fewshot.clip_grad_norm": positive(optional=True),
    "fewshot.val_every": integer(1),
    "fewshot.val_episodes": integer(1, 1_000_000),
    "fewshot.test_episodes": integer(2, 1_000_000),
    "fewshot.eval_seed": integer(0),
    "fewshot.compile": boolean(),
    "episodes.way": integer(2),
    "episodes.shot": integer(1),
    "episodes.query": integer(1),
    "episodes.per_class": integer(2),
    "episodes.classes": int_list(2, nonempty=True),
    "episodes.data_seed": integer(0),
    "fewshot_loss.loss": loss_name(),
    "fewshot_loss.hidden": integer(1),
    "fewshot_loss.adapter_hidden": integer(1),
    "fewshot_loss.query": boolean(),
    "fewshot_loss.adaptive": boolean(),
    "fewshot_loss.residual": boolean(),
    # optimizers: optim (torch.optim), optim (functional), meta_optim (torch.optim)
    "*optim.lr": positive(),
    "*optim.weight_decay": real(0),
    "*optim.momentum": real(0, 1, hi_open=True),
    "*optim.dampening": real(0, 1),
    "*optim.betas": unit_pair(),
    "*optim.eps": positive(),
    "*optim.rho": real(0, 1),
    "*optim.alpha": real(0, 1),
    "*optim.lr_decay": real(0),
    "*optim.momentum_decay": real(0),
    # meta_optim=cmaes (metaloss.cmaes; cross-checks in metaloss.cmaes.config_problems)
    "meta_optim.sigma0": positive(),
    "meta_optim.popsize": integer(2, 100_000, optional=True),
    "meta_optim.seed": integer(0, 2**32 - 1),
    "meta_optim.objective": one_of(
        "error", "balanced_error", "macro_f1_loss", "iou_loss", "recall_error", optional=True
    ),
    "meta_optim.chunk": integer(1, optional=True),
    # meta_optim=gp (metaloss.gp; cross-checks in metaloss.gp.config_problems)
    "meta_optim.generations": integer(1),
    "meta_optim.tournament": integer(1, 100_000),
    "meta_optim.crossover": real(0, 1),
    "meta_optim.mutation": real(0, 1),
    "meta_optim.elites": integer(0, 100_000),
    "meta_optim.init_depth": integer(1, 64),
    "meta_optim.max_depth": integer(1, 64),
    "meta_optim.refine_lr": positive(),
    # hypergradient methods
    "hypergrad.k": integer(1),
    "hypergrad.population": integer(1, 100_000),
    "hypergrad.chunk": integer(1, optional=True),
    "hypergrad.solver": one_of("neumann", "cg"),
    "hypergrad.iterations": integer(1, 100_000),
    "hypergrad.alpha": positive(optional=True),
    "hypergrad.damping": real(0),
    "hypergrad.tolerance": real(0),
    "hypergrad.batches": integer(1),
    "hypergrad.segment": integer(1, optional=True),
    "hypergrad.vectorize": boolean(),
    "hypergrad.sigma": positive(),
    "hypergrad.objective": one_of("error", optional=True),
    "hypergrad.compile": boolean(),
    "hypergrad.seed": integer(0),
    # tasks
    "task.seed": integer(0),
    "task.n_train": integer(2, 10_000_000),
    "task.n_val": integer(1, 10_000_000),
    "task.n_test": integer(1, 10_000_000),
    "task.num_samples": integer(10, 10_000_000),
    "task.data_seed": integer(0),
    "task.noise": real(0),
    "task.val_frac": real(0, 1, lo_open=True, hi_open=True),
    "task.test_frac": real(0, 1, lo_open=True, hi_open=True),
    "task.imbalance_ratio": real(1, optional=True),
    "task.imbalance_profile": one_of("index", "rank"),
    "task.label_noise.rate": real(0, 1, hi_open=True),
    "task.label_noise.kind": one_of("symmetric", "pair"),
    "task.positive_classes": classes(),
    "task.amplitude": interval(lo=0, lo_open=True),
    "task.phase": interval(),
    "task.x_range": interval(strict=True),
    "task.fraction": real(0, 1, hi_open=True),
    "task.magnitude": real(0),
    "task.corrupt_val": boolean(),
    "task.size": integer(8, 1024),
    "task.max_shapes": integer(1, 100),
    "task.radius": interval(lo=0, lo_open=True),
    # task=tabular (metaloss.tasks.tabular: the file's contents are checked when it is read)
    "task.source": tabular_source(),
    "task.kind": one_of(*TABULAR_KINDS),
    "task.target": text(optional=True),
    "task.standardize_x": boolean(),
    "task.standardize_y": boolean(),
    # models
    "model.hidden": int_list(1, hi=1_000_000),
    "model.activation": one_of("relu", "tanh", "gelu", "silu"),
    "model.channels": integer(1, 65_536),
    "model.kernel": integer(1, 4096),
    "model.depth": integer(1, 256),
    "model.groups": integer(1),
    "model.base": integer(1, 4096),
    # logging
    "logger.kind": one_of("wandb", "none"),
    "logger.mode": one_of(
        "offline", "online", "disabled", "dryrun", "run"
    ),  # W&B's aliases: dryrun, run
    "logger.init_timeout": positive(),
    "logger.project": text(),
    "logger.entity": text(optional=True),
    "logger.group": text(optional=True),
    "logger.tags": strings(),
    "logger.base_url": text(optional=True),
    "logger.dir": text(optional=True),
}

# ---------------------------------------------------------------- the check


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys with their values; a node is yielded too (rules may check whole lists/maps)."""
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key, v
            if isinstance(v, dict):
                yield from _flatten(v, key)


def _loss_problems(node: Any, where: str) -> list[str]:
    if not isinstance(node, dict) or "_target_" not in node:
        return []
    rules = LOSS_RULES.get(str(node["_target_"]).rsplit(".", 1)[-1], {})
    out = []
    for key, check in rules.items():
        if key in node:
            msg = check(node[key])
            if msg:
                out.append(f"{where}.{key} = {node[key]!r}: must be {msg}")
    if rules is LOSS_RULES.get("SymbolicLoss") and isinstance(node.get("expression"), str):
        try:  # the expression is parsed (never evaluated) before anything runs
            tokens = parse_expression(
                node["expression"], max_nodes=int(node.get("max_nodes", 1023))
            )
        except (ExpressionError, TypeError, ValueError) as e:
            out.append(f"{where}.expression: {e}")
            return out
        k, cap = sum(isinstance(t, float) for t in tokens), node.get("max_constants", 8)
        if is_int(cap) and k > cap:
            out.append(
                f"{where}.max_constants = {cap}: the expression has {k} constants; raise it to "
                f">= {k}"
            )
    return out


# Top-level keys any app knows; a `+key=...` outside them would be silently ignored.
KNOWN_TOP_LEVEL = {
    "seed",
    "seeds",
    "metric",
    "progress",
    "device",
    "dtype",
    "threads",
    "trusted_modules",
    "allow_other_task",
    "train",
    "meta",
    "meta_test",
    "compare",
    "loss_path",
    "task",
    "model",
    "loss",
    "optim",
    "meta_optim",
    "hypergrad",
    "logger",
    "hydra",
    "tune",
    "episodes",  # metaloss-fewshot
    "fewshot_loss",
    "maml",
    "fewshot",
}
RENAMED = {"inner_optim": "optim (one optimizer group for every app)"}


def problems(cfg: DictConfig | dict, app: str | None = None) -> list[str]:
    """Every invalid setting of a composed config, as readable lines (empty: all valid).
    ``app``: as :func:`check_config`'s."""
    out = []
    with using_searchpath(cfg):  # loss names are checked against the run's config sources
        if (
            isinstance(cfg, DictConfig) and "hydra" in cfg
        ):  # checked as the app sees it: no hydra node
            keep: list[Any] = [k for k in cfg if k != "hydra"]
            cfg = OmegaConf.masked_copy(cfg, keep)
        container = cast(
            dict,
            OmegaConf.to_container(cfg, resolve=True)
            if isinstance(cfg, DictConfig | ListConfig)
            else cfg,
        )
        container = {k: v for k, v in container.items() if k != "hydra"}
        for key in container:
            if key in RENAMED:
                out.append(
                    f"{key}: renamed to {RENAMED[key]}; use "
                    f"{key.replace(key, RENAMED[key].split()[0])}=... "
                    "(a `+` override of the old name would be silently ignored)"
                )
            elif key not in KNOWN_TOP_LEVEL:
                out.append(
                    f"{key}: not a metaloss setting (added with `+`?); it would be silently "
                    "ignored. "
                    f"Settings: {', '.join(sorted(KNOWN_TOP_LEVEL - {'hydra'}))}"
                )
        for key, value in _flatten(container):
            for pattern, check in RULES.items():
                if fnmatch.fnmatchcase(key, pattern):
                    msg = check(value)
                    if msg:
                        out.append(f"{key} = {value!r}: must be {msg}")
                    break
        out += _loss_problems(container.get("loss"), "loss")
        out += _unknown_arguments(container)
        out += _cross_checks(container, app)
    return out


COMPONENTS = (
    "task",
    "model",
    "loss",
    "optim",
    "meta_optim",
    "hypergrad",
    "episodes",
    "fewshot_loss",
)
# keys of a component that its app reads before building it (not arguments of the target)
APP_READS = {"fewshot_loss": {"loss_params"}}


def _unknown_arguments(c: dict) -> list[str]:
    """Keys of a component (``_target_`` node) that its target does not take: e.g.
    ``meta_optim=cmaes`` under an experiment that set ``meta_optim.lr`` for Adam used to fail
    with a TypeError traceback at construction; a misspelt key of a ``**kwargs`` target is
    not caught here (nothing can tell it from a real one)."""
    out = []
    for where in COMPONENTS:
        node = c.get(where)
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            continue
        try:
            sig = inspect.signature(get_object(node["_target_"]))
        except Exception:  # not importable / no signature: instantiate will say so
            continue
        params = sig.parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for key in node:
            if key in APP_READS.get(where, ()):
                continue
            if not str(key).startswith("_") and key not in params:
                valid = ", ".join(
                    n
                    for n, p in params.items()
                    if p.kind is not inspect.Parameter.VAR_POSITIONAL
                    and n not in ("self", "params")
                )
                out.append(
                    f"{where}.{key}: not a setting of {where} ({node['_target_']}); it takes: "
                    f"{valid or 'nothing'} (left over from another {where} choice? remove it with "
                    f"~{where}.{key})"
                )
    return out


def _cross_checks(c: dict, app: str | None = None) -> list[str]:
    """Rules that relate two settings."""
    out = []
    meta, hg = c.get("meta") or {}, c.get("hypergrad") or {}
    k, inner = hg.get("k"), meta.get("inner_steps")
    if is_int(k) and is_int(inner) and k > inner:
        out.append(
            f"hypergrad.k = {k}: must be <= meta.inner_steps ({inner}): truncation cannot "
            "keep more steps than the inner loop has"
        )
    nb = hg.get("batches")
    if is_int(nb) and is_int(inner) and nb > inner:
        out.append(f"hypergrad.batches = {nb}: must be <= meta.inner_steps ({inner})")
    if _target_name(hg) == "Implicit" and meta.get("learn_inner_lr") is True:
        out.append(
            "meta.learn_inner_lr = true: hypergrad=implicit cannot meta-learn the inner learning "
            "rate (the "
            "end point of a converged inner run does not depend on it: its hypergradient is always "
            "zero); set "
            "meta.learn_inner_lr=false, or use hypergrad=unrolled, checkpointed, truncated or es"
        )
    out += cmaes_problems(c)
    out += gp_problems(c)
    sel = meta.get("selection") or {}
    if (
        is_real(sel.get("margin"))
        and sel["margin"] > 0
        and not (is_real(sel.get("frac")) and sel["frac"] > 0)
    ):
        out.append(
            f"meta.selection.margin = {sel['margin']} with meta.selection.frac = "
            f"{sel.get('frac')}: the margin applies to held-out selection, which is off; set "
            "meta.selection.frac > 0 (e.g. 0.2) or the margin to 0"
        )
    if is_real(sel.get("frac")) and sel["frac"] > 0:
        if meta.get("mode") == "online":
            out.append(
                "meta.selection.frac > 0 with meta.mode = 'online': selection compares φ kept "
                "along one run's trajectory on fresh models, which online mode does not train; "
                "set meta.selection.frac=0"
            )
        if meta.get("val_from_train") is True:
            out.append(
                "meta.selection.frac > 0 with meta.val_from_train = true: the outer objective "
                "reads no validation split to hold rows out of; set one of them off"
            )
    mt = c.get("meta_test") or {}
    # metaloss-tune writes the tuned.json this needs (its command sets meta_test.tuned=null)
    if mt.get("tune_learned_lr") is True and mt.get("tuned") is None and app != "tune":
        out.append(
            "meta_test.tune_learned_lr = true needs meta_test.tuned: the learned loss's lr is "
            "tuned with the budget, seeds and metric the baselines' tuned.json records"
        )
    task = c.get("task") or {}
    vf, tf = task.get("val_frac"), task.get("test_frac")
    if is_real(vf) and is_real(tf) and vf + tf >= 1:
        out.append(
            f"task.val_frac + task.test_frac = {vf + tf}: must be < 1 (nothing left to train on)"
        )
    model = c.get("model") or {}
    ch, groups = model.get("channels", model.get("base")), model.get("groups")
    if is_int(ch) and is_int(groups) and groups > 0 and ch % groups:
        key = "model.channels" if "channels" in model else "model.base"
        out.append(f"model.groups = {groups}: must divide {key} ({ch}) for GroupNorm")
    tune = c.get("tune")
    if isinstance(tune, dict) and (tune.get("n_trials") is None) == (
        tune.get("budget_steps") is None
    ):
        out.append(
            f"tune.n_trials = {tune.get('n_trials')!r}, tune.budget_steps = "
            f"{tune.get('budget_steps')!r}: "
            "give exactly one (set tune.n_trials=null when giving tune.budget_steps)"
        )
    overrides = (c.get("meta_test") or {}).get("task_overrides")
    if isinstance(overrides, dict) and overrides and task:
        merged = {**task, **overrides}
        for line in problems({"task": merged}):
            out.append(
                line.replace("task.", "meta_test.task_overrides.", 1)
                if line.split(" ", 1)[0].split(".", 1)[-1] in overrides
                else line
            )
    return out


def _target_name(node: Any) -> str:
    """The class (or function) name a component's ``_target_`` names, '' if none."""
    target = node.get("_target_") if hasattr(node, "get") else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _symbolic_problems(cfg: Any, kind: str) -> list[str]:
    """A symbolic loss whose expression is no loss for this task kind (constant, not finite,
    rewarding the wrong answer: metaloss.losses.symbolic.shape_problem), refused before
    training; and CMA-ES on a symbolic loss with unused constant slots (it would evolve them)."""
    loss = cfg.get("loss") or {}
    if _target_name(loss) != "SymbolicLoss" or not isinstance(loss.get("expression"), str):
        return []
    try:
        tokens = parse_expression(loss["expression"])
    except (ExpressionError, RecursionError):
        return []  # said by the settings check
    out = []
    reason = shape_problem(tokens, kind)
    if reason is not None:
        out.append(f"loss.expression = {loss['expression']!r}: is no loss for {kind}: {reason}")
    k = sum(isinstance(t, float) for t in tokens)
    if _target_name(cfg.get("meta_optim") or {}) == "CMAES" and loss.get("max_constants") != k:
        out.append(
            f"loss.max_constants = {loss.get('max_constants')}: with meta_optim=cmaes it must be "
            f"the expression's {k} constant(s) (CMA-ES would evolve unused slots too)"
            + ("; an expression without constants has nothing to evolve" if k == 0 else "")
        )
    return out


def _objective_problems(cfg: Any, kind: str, name: str) -> list[str]:
    """A true-metric objective of ES (``hypergrad.objective``) or CMA-ES
    (``meta_optim.objective``) that means nothing for this task kind (an error rate on a
    regression task): refused, naming the key, its value and what is valid for the kind."""
    out = []
    for key, node, kinds in (
        ("hypergrad.objective", cfg.get("hypergrad") or {}, es_kinds),
        ("meta_optim.objective", cfg.get("meta_optim") or {}, cmaes_kinds),
    ):
        value = (
            node.get("objective")
            if _target_name(node) in ("EvolutionStrategies", "CMAES", "GeneticProgramming")
            else None
        )
        if value is None or value not in kinds or kind in kinds[value]:
            continue  # unset, or an unknown name (check_config names those)
        valid = [n for n, ks in kinds.items() if kind in ks]
        out.append(
            f"{key} = {value!r}: means nothing for {kind} task {name!r} (it is for "
            f"{' / '.join(kinds[value])} tasks); valid for {kind}: null (meta.objective)"
            + "".join(f", {v}" for v in valid)
        )
    return out


def _seed_stream_problems(cfg: DictConfig, task: Any, fresh: bool) -> list[str]:
    """Meta-training (and tuning) draw task seeds ``task.seed ..`` (``meta.train_tasks`` of a
    family), the meta-test ``10000 ..`` (metaloss.tasks.base.TEST_TASK_SEEDS): the two
    streams must not meet, or the learned loss would be tested on data it was trained on."""
    if not fresh:
        return []
    seed = int(cfg.task.get("seed", 0) or 0)
    n_train = int(cfg.meta.get("train_tasks", 1)) if task.distribution and "meta" in cfg else 1
    # a classification draw also seeds its imbalance and noise draws with seed + 1, seed + 2
    train = range(seed, seed + n_train + 2)
    test = meta_test_draws(int(cfg.meta_test.seeds), int(cfg.meta_test.tasks_per_seed))
    if train.start < test.stop and test.start < train.stop:
        return [
            f"task.seed = {seed} (with {n_train} training task(s)): the training draws' seeds "
            f"{train.start}.."
            f"{train.stop - 1} meet the meta-test's draws {test.start}..{test.stop - 1}; use a "
            "task.seed "
            f"below {test.start - n_train - 1} (or above {test.stop - 1})"
        ]
    return []


def check_config(cfg: DictConfig | dict, app: str | None = None) -> None:
    """Raise :class:`ConfigError` listing every invalid setting; return quietly otherwise.
    ``app``: the command the config is for (``"tune"`` skips the meta-test's own cross-checks:
    metaloss-tune reads meta_test's budget but never runs a meta-test)."""
    found = problems(cfg, app)
    if found:
        raise ConfigError(
            "invalid settings (nothing was run):\n  " + "\n  ".join(dict.fromkeys(found))
        )


MAX_MODEL_PARAMS = 100_000_000  # ~400 MB of float32 weights per model, before T-fold vmap copies


def check_against_task(cfg: DictConfig, task: Any) -> None:
    """The checks that need the task (its kind, classes, shapes), run right after the data is
    made and before any training: the model is built shape-only on the ``meta`` device (no
    memory) and run on two examples, so a model that does not fit the task, or is too big,
    is refused with its reason instead of failing deep inside training."""
    found = []
    val_batch = OmegaConf.select(cfg, "meta.val_batch")
    if task.kind == "embedding" and val_batch is not None:
        found.append(
            f"meta.val_batch = {val_batch}: validation batches are drawn with replacement, and on "
            "an embedding task a repeated row is its own nearest neighbour (a free correct "
            "retrieval, a free positive pair): the objective would flatter every loss; set "
            "meta.val_batch=null (the whole validation split)"
        )
    mt = cfg.get("meta_test")
    if mt is not None:
        metric = mt.get("metric")
        # exactly what the meta-test records (train/loss, val/*, test/*), checked before
        # meta-training
        if metric is not None and metric not in train_result_names(task.kind):
            found.append(
                f"meta_test.metric = {metric!r}: must be one of "
                f"{', '.join(metric_names(task.kind, 'test'))} for {task.kind} task {task.name!r}"
            )
        fresh = task.distribution or bool(mt.get("fresh_draws", False))
        if mt.get("task_overrides") and not fresh:
            found.append(
                f"meta_test.task_overrides = {dict(mt.task_overrides)}: only fresh test draws (a "
                "task "
                f"family, or meta_test.fresh_draws=true) can be overridden; {task.name!r} is a "
                "single "
                "task tested on its own draw, so nothing would be overridden"
            )
        found += _seed_stream_problems(cfg, task, fresh)
        profile = (cfg.get("task") or {}).get("imbalance_profile", "rank")
        if (
            fresh
            and not task.distribution
            and (cfg.get("task") or {}).get("imbalance_ratio")
            and profile == "rank"
        ):
            found.append(
                "task.imbalance_profile = 'rank' with meta_test.fresh_draws = true: each draw "
                "would rank the "
                "classes anew, so head and tail (and a learned loss's per-class parameters) would "
                "move "
                "between draws; set task.imbalance_profile=index (class 0 the head on every draw, "
                "Cui et "
                "al. 2019) or meta_test.fresh_draws=false"
            )
    tune = cfg.get("tune")
    if (
        tune is not None
        and tune.get("metric") is not None
        and tune.metric not in metric_names(task.kind, "val")
    ):
        found.append(
            f"tune.metric = {tune.metric!r}: must be one of "
            f"{', '.join(metric_names(task.kind, 'val'))} "
            f"for {task.kind} task {task.name!r}"
        )
    if (
        "train" in cfg
        and cfg.get("metric") is not None
        and cfg.metric not in train_result_names(task.kind)
    ):
        found.append(
            f"metric = {cfg.metric!r}: must be one of {', '.join(train_result_names(task.kind))} "
            f"for {task.kind} task {task.name!r}"
        )
    found += _objective_problems(cfg, task.kind, task.name)
    found += _symbolic_problems(cfg, task.kind)
    n_cls = (cfg.get("loss") or {}).get("num_classes")
    expected = task.num_classes or 2
    if n_cls is not None and task.kind in ("classification", "binary") and n_cls != expected:
        found.append(
            f"loss.num_classes = {n_cls}: must be {expected} (the classes of task {task.name!r}) "
            "or null"
        )
    model_name = str(cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]
    try:
        with torch.device("meta"):
            model = instantiate(cfg.model)(in_shape=task.in_shape, out_dim=task.out_dim)
        n_params = sum(p.numel() for p in model.parameters())
        if n_params > MAX_MODEL_PARAMS:
            found.append(
                f"model: {model_name} has {n_params:,} parameters for task {task.name!r}; the "
                "limit is "
                f"{MAX_MODEL_PARAMS:,} (shrink model.hidden / channels / depth)"
            )
        else:
            with torch.no_grad():
                out = model(task.x_train[:2].to("meta"))
            want = _expected_output(task)
            if tuple(out.shape) not in want:
                found.append(
                    f"model: {model_name} does not fit {task.kind} task {task.name!r}: it outputs "
                    f"{list(out.shape)} for 2 examples, the task needs {list(want[0])}"
                    + (" (use model=unet)" if task.kind == "segmentation" else "")
                )
    except (ValueError, RuntimeError, TypeError) as e:
        found.append(
            f"model: {model_name} cannot be built for task {task.name!r} (inputs "
            f"{list(task.in_shape)}): "
            f"{str(e).splitlines()[0][:300]}"
        )
    if found:
        raise ConfigError(
            "invalid settings for this task (nothing was trained):\n  " + "\n  ".join(found)
        )


def _expected_output(task: Any) -> list[tuple[int, ...]]:
    if task.kind == "segmentation":
        return [(2, *task.y_train.shape[1:])]
    if task.kind == "binary":
        return [(2, 1), (2,)]
    return [(2, task.out_dim)]

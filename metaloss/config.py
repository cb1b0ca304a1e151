"""Where the Hydra configs live, and the checks that read them (the only registry)."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import torch
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_repository import ConfigRepository
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from metaloss import kinds
from metaloss.errors import ConfigError
from metaloss.losses.base import ParametricLoss, check_loss_output, loss_kinds
from metaloss.runs import register_resolvers
from metaloss.tune import TunedFileError, load_tuned

log = logging.getLogger("metaloss")

register_resolvers()  # ${metaloss.uid:} / ${metaloss.slug:} in the run directories of conf/*.yaml


def _no_file(path: Any) -> bool:
    """A resolver's tuned.json argument that names no file (``null`` in YAML, or as text)."""
    return path is None or str(path) in ("", "None", "null")


def tuned_params(path: Any, name: Any) -> dict[str, Any]:
    """``${metaloss.tuned_params:<tuned.json or null>,<loss name>}``: that loss's tuned
    hyper-parameters in the file, checked as every tuned.json is (a warm start's base,
    ``conf/loss/residual.yaml``); ``{}`` without a file, or for a loss the file did not tune."""
    if _no_file(path):
        return {}
    entry = load_tuned(path)["losses"].get(str(name))
    return dict(entry["params"]) if entry else {}


def tuned_lr(path: Any, name: Any, without_file: Any = None) -> float:
    """``${metaloss.tuned_lr:<tuned.json or null>,<loss name>[,<lr without a file>]}``: the
    learning rate that file tuned for that loss — a warm start searched where its base is at
    its best (``optim.lr`` of ``conf/experiment/*_warm_lr.yaml``). ``without_file`` is used only
    when there is no file at all (``debug=default`` drops ``meta_test.tuned``); a file that
    lacks the loss, or tuned it without its lr, is an error naming the file, never a silent
    default."""
    if _no_file(path):
        if without_file is None:
            raise ConfigError(
                f"metaloss.tuned_lr: no tuned.json to read {name!r}'s tuned lr from "
                "(set meta_test.tuned=<path to tuned.json>)"
            )
        try:
            lr = float(without_file)
        except (TypeError, ValueError):
            lr = float("nan")
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(
                f"metaloss.tuned_lr: the lr without a file = {without_file!r}: must be a number > 0"
            )
        log.warning(
            "metaloss.tuned_lr: no tuned.json (meta_test.tuned = null): %r searched at the "
            "config's fallback lr %g, not at its tuned lr",
            str(name),
            lr,
        )
        return lr
    losses = load_tuned(path)["losses"]
    entry = losses.get(str(name))
    if entry is None:
        raise TunedFileError(
            f"metaloss.tuned_lr: {path} has no tuned entry for {name!r} (it has "
            f"{', '.join(losses)})"
        )
    if entry.get("lr") is None:
        raise TunedFileError(
            f"metaloss.tuned_lr: {path} tuned {name!r} without its lr (tune.lr=false)"
        )
    return float(entry["lr"])


if not OmegaConf.has_resolver("metaloss.tuned_params"):
    OmegaConf.register_new_resolver("metaloss.tuned_params", tuned_params)
if not OmegaConf.has_resolver("metaloss.tuned_lr"):
    OmegaConf.register_new_resolver("metaloss.tuned_lr", tuned_lr)


def conf_dir() -> Path:
    """The `conf/` directory: inside the package for a built wheel, at the repo top for a
    source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"metaloss configs not found next to {here} (looked for conf/train.yaml)"
    )


# ---------------------------------------------------------------- the run's config sources
#
# A user adds a loss, task or model by putting `loss/<name>.yaml` (etc.) in a directory of
# their own and passing `hydra.searchpath=[file:///that/dir]` (or a `pkg://` package). Hydra
# composes `loss=<name>` from it; everything that looks a config option up *by name* at run
# time (`compare:`, `meta.objective`, the validation of those keys, the catalogue) must see
# the same options, so it goes through Hydra's own ConfigRepository over the same search
# path Hydra builds: hydra's configs, this package's conf/ ("main"), search-path plugins,
# then every `hydra.searchpath` entry in order. The first source that has an option wins,
# so a user's `loss/mse.yaml` is shadowed by the package's, exactly as in `loss=mse`.

_ACTIVE_SEARCHPATH: ContextVar[tuple[str, ...] | None] = ContextVar(
    "metaloss_searchpath", default=None
)


class UnknownOption(ValueError):
    """A config option that no source of the run's search path has."""


def searchpath(cfg: Any = None) -> tuple[str, ...]:
    """The run's ``hydra.searchpath`` entries. Taken from ``cfg.hydra.searchpath`` when the
    config carries its Hydra node (``compose(..., return_hydra_config=True)``), else from the
    enclosing :func:`using_searchpath`, else from the running Hydra app (``HydraConfig``: the
    apps' configs have no ``hydra`` node), else none (the package's conf/ only)."""
    hydra_node = cfg.get("hydra") if isinstance(cfg, Mapping | DictConfig) else None
    if hydra_node is not None and hydra_node.get("searchpath") is not None:
        return tuple(str(p) for p in hydra_node.get("searchpath"))
    active = _ACTIVE_SEARCHPATH.get()
    if active is not None:
        return active
    if HydraConfig.initialized():
        # HydraConfig.get() is annotated as the HydraConf dataclass; it returns the DictConfig
        # node ``hydra`` of the app's config
        hydra_cfg = cast(DictConfig, HydraConfig.get())
        return tuple(str(p) for p in (hydra_cfg.get("searchpath") or ()))
    return ()


@contextmanager
def using_searchpath(cfg: Any) -> Iterator[tuple[str, ...]]:
    """Within the block, lookups without a ``cfg`` use ``cfg``'s search path (validation
    checks see single values, not the config they belong to)."""
    paths = searchpath(cfg)
    token = _ACTIVE_SEARCHPATH.set(paths)
    try:
        yield paths
    finally:
        _ACTIVE_SEARCHPATH.reset(token)


@lru_cache(maxsize=32)
def _search_path(paths: tuple[str, ...]) -> tuple[Any, ConfigRepository]:
    """Hydra's search path for the apps plus ``paths``, built as Hydra builds it (the user
    entries go after the primary config dir and the plugins, before the schema source).
    Sources read their files on every call, so caching the repository is safe."""
    sp = create_config_search_path(f"file://{conf_dir()}")
    schema = sp.get_path().pop(-1)
    assert schema.provider == "schema"
    for path in paths:
        sp.append(provider="hydra.searchpath", path=path)
    sp.append("schema", "structured://")
    return sp, ConfigRepository(config_search_path=sp)


def group_options(group: str, cfg: Any = None) -> list[str]:
    """The option names of a config group in every source of the run's search path, e.g.
    ``group_options("loss", cfg)`` (no ``cfg``: see :func:`searchpath`)."""
    return _search_path(searchpath(cfg))[1].get_group_options(
        group, results_filter=ObjectType.CONFIG
    )


def load_option(group: str, name: str, cfg: Any = None) -> DictConfig:
    """Option ``<group>/<name>`` exactly as ``<group>=<name>`` would compose it in this run:
    from the first source that has it; an option with its own defaults list is composed by
    Hydra's config loader."""
    sp, repo = _search_path(searchpath(cfg))
    path = f"{group}/{name}"
    if not isinstance(name, str) or not repo.config_exists(path):
        where = ", ".join(["conf/"] + [f"hydra.searchpath {p}" for p in searchpath(cfg)])
        raise UnknownOption(
            f"unknown {group} {name!r} (looked in {where}); valid: "
            f"{', '.join(group_options(group, cfg))}"
        )
    loaded = repo.load_config(path)
    assert loaded is not None  # the repository has it (config_exists above)
    if not any(not d.is_self() for d in loaded.defaults_list or ()):
        # Hydra types a loaded config as any Container; an option of the groups looked up here
        # (loss, task, model, optim) is a mapping, loaded as a DictConfig
        return cast(DictConfig, loaded.config)
    composed = ConfigLoaderImpl(config_search_path=sp).load_configuration(
        config_name=None, overrides=[f"+{group}={name}"], run_mode=RunMode.RUN, from_shell=False
    )
    return OmegaConf.select(composed, group.replace("/", "."))


@lru_cache(maxsize=32)
def _loss_catalogue(paths: tuple[str, ...]) -> dict[str, Any]:
    """Loss option name -> the object its ``_target_`` names (options whose target cannot
    be imported are left out), for the search path ``paths``."""
    cfg, out = {"hydra": {"searchpath": list(paths)}}, {}
    for name in group_options("loss", cfg):
        try:
            out[name] = get_object(str(load_option("loss", name, cfg).get("_target_")))
        except Exception:  # noqa: BLE001 - a user's broken or unimportable config is not listed
            continue
    return out


def losses_for(kind: str, cfg: Any = None) -> list[str]:
    """Names of the catalogued losses that fit a task kind (`learned`: kinds from its file)."""
    out = []
    for name, target in _loss_catalogue(searchpath(cfg)).items():
        try:
            if kind in loss_kinds(target):
                out.append(name)
        except (TypeError, ValueError):
            continue
    return out


def parametric_losses(cfg: Any = None) -> list[str]:
    """Names of the catalogued losses whose ``_target_`` is a ParametricLoss subclass: the
    losses ``metaloss-meta`` can meta-train."""
    return [
        n
        for n, t in _loss_catalogue(searchpath(cfg)).items()
        if isinstance(t, type) and issubclass(t, ParametricLoss)
    ]


class LossDoesNotFitTask(ValueError):
    """Raised before training when the chosen loss cannot be used on the task."""


def check_loss_fits(loss: Any, task_kind: str, task_name: str, loss_name: str | None) -> None:
    """Fail early, naming the valid choices, when a loss does not fit the task kind (or does
    not say which kinds it fits)."""
    try:
        kinds = loss_kinds(loss)
    except TypeError as e:  # a user's function without @fits(...): a setting to fix, not a bug
        raise LossDoesNotFitTask(f"loss {loss_name or loss!r}: {e}") from None
    if task_kind not in kinds:
        raise LossDoesNotFitTask(
            f"loss {loss_name or loss!r} fits {sorted(kinds)} tasks, but task {task_name!r} is "
            f"{task_kind}. Losses for {task_kind} tasks: {', '.join(losses_for(task_kind))}"
        )


class LearnedLossOtherTask(ValueError):
    """A learned loss used on a task other than the one its file records, without permission."""


def training_setup(cfg: Any) -> dict[str, Any]:
    """What a learned-loss file records of the run that trained it, as plain values: for the
    task, model and inner optimizer, the config's ``_target_`` (as ``target``: never called
    from the file, only matched against this run's config options), its other values and
    the option name when Hydra knows it; and the meta-test's ``task_overrides``. metaloss-eval
    takes these when its command line does not set them (:func:`setup_from_file`)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    out: dict[str, Any] = {}
    for group in SETUP_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        values = _plain_dict(node)
        target = values.pop("_target_", None)
        values.pop("_partial_", None)
        rec = {"option": choices.get(group), "target": target, "config": values}
        if rec["option"] is None:  # outside a Hydra app: the option these values came from
            try:
                rec["option"] = _option_name(group, rec, cfg)
            except Exception:  # noqa: BLE001 - a name is a convenience for messages, never required
                rec["option"] = None
        out[group] = rec
    overrides = OmegaConf.select(cfg, "meta_test.task_overrides")
    out["task_overrides"] = _plain_dict(overrides) if overrides else {}
    return out


SETUP_GROUPS = ("task", "model", "optim")


def _plain_dict(node: Any) -> dict[str, Any]:
    """``dict`` of a config mapping's resolved values. ``OmegaConf.to_container`` is annotated
    with every kind of container; for a mapping node it returns a dict (``dict()`` refuses
    what is not a mapping, as it always did here)."""
    return dict(cast(Mapping[str, Any], OmegaConf.to_container(node, resolve=True)))


_UNSET = object()


def _show(v: Any) -> str:
    return "(unset)" if v is _UNSET else repr(v)


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str) -> list[str]:
    keys = list(dict.fromkeys([*recorded, *current]))
    return [
        f"{prefix}.{k}: file {_show(recorded.get(k, _UNSET))}, "
        f"this run {_show(current.get(k, _UNSET))}"
        for k in keys
        if recorded.get(k, _UNSET) != current.get(k, _UNSET)
    ]


def _recorded_overrides(group: str, rec: Mapping[str, Any], cfg: Any) -> str:
    """The command-line overrides that select a recorded component: ``task=<option>`` and the
    values that differ from that option's defaults."""
    config, name = dict(rec.get("config") or {}), rec.get("option")
    try:
        defaults = _plain_dict(load_option(group, name, cfg)) if name else {}
    except Exception:  # noqa: BLE001 - an option this run's sources lack: every value
        defaults = {}
    parts = [f"{group}={name}"] if name else []
    parts += [
        f"{group}.{k}={_override_value(v)}"
        for k, v in config.items()
        if defaults.get(k, _UNSET) != v
    ]
    return " ".join(parts)


def check_trained_task(loss: Any, task: Any, cfg: Any = None, loss_name: str | None = None) -> None:
    """Refuse a learned loss (one loaded from a file: it has ``meta``) on a task other than the
    one its file records, unless it was loaded with ``allow_other_task=true``. With the run's
    config, the whole task config is compared (a loss meta-trained on sine amplitudes [1, 1] is
    refused for [0.1, 5]); without it, or for a file that records only the task's name, the
    names are."""
    meta = getattr(loss, "meta", None)
    if not isinstance(meta, Mapping):
        return
    source = getattr(loss, "source", None) or loss_name or type(loss).__name__
    recorded = (meta.get("setup") or {}).get("task")
    current = cfg.get("task") if cfg is not None else None
    if recorded is not None and current is not None:
        now = _plain_dict(current)
        target = now.pop("_target_", None)
        now.pop("_partial_", None)
        trained = recorded.get("option") or meta.get("task") or recorded.get("target")
        if recorded.get("target") != target:
            diffs = [
                f"task {trained!r} ({recorded.get('target')}) "
                f"vs this run's {task.name!r} ({target})"
            ]
            fix = _recorded_overrides("task", recorded, cfg)
        else:
            rec_config = recorded.get("config") or {}
            diffs = _differences(rec_config, now, "task")
            fix = " ".join(
                f"task.{k}={_override_value(rec_config.get(k))}"
                for k in dict.fromkeys([*rec_config, *now])
                if rec_config.get(k, _UNSET) != now.get(k, _UNSET)
            )
        fix = (
            f"pass the task it was trained on ({fix}; metaloss-eval takes it from the file "
            "when task is unset)"
        )
    elif meta.get("task") is not None:
        diffs = (
            [f"task name: file {meta['task']!r}, this run {task.name!r}"]
            if meta["task"] != task.name
            else []
        )
        trained, fix = (
            meta["task"],
            f"pass task={meta['task']} (and the task settings it was trained with)",
        )
    else:
        log.warning(
            "learned loss %s does not record the task it was trained on; it cannot be checked "
            "against task %r",
            source,
            task.name,
        )
        return
    if not diffs:
        return
    if getattr(loss, "allow_other_task", False):
        log.warning(
            "learned loss %s was meta-trained on task %s and is applied to task %r on purpose "
            "(allow_other_task): %s",
            source,
            trained,
            task.name,
            "; ".join(diffs[:5]),
        )
        return
    raise LearnedLossOtherTask(
        f"learned loss {source} was meta-trained on another task than this run's {task.name!r}: "
        f"{'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}. "
        f"To evaluate it where it was trained, {fix}; "
        "to apply it to another task on purpose, set loss.allow_other_task=true (metaloss-eval: "
        "allow_other_task=true)"
    )


def _override_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_override_value(x)}" for k, x in v.items()) + "}"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def check_loss(loss: Any, task: Any, loss_name: str | None, cfg: Any = None) -> None:
    """The one gate every loss passes before training uses it: it fits the task kind
    (:func:`check_loss_fits`), a learned loss fits the task it was trained on
    (:func:`check_trained_task`), and it returns one value per example
    (:func:`check_loss_output`; not on a task with a loop of its own, which calls its losses
    its own way: :attr:`metaloss.kinds.TaskKind.own_loop`)."""
    check_loss_fits(loss, task.kind, task.name, loss_name)
    check_trained_task(loss, task, cfg, loss_name)
    if not kinds.get(task.kind).own_loop:  # a loop of its own calls its losses its own way
        check_loss_output(loss, task, loss_name)


def setup_from_file(
    cfg: DictConfig, meta: Mapping[str, Any], given: set[str], source: str
) -> DictConfig:
    """``cfg`` with the task, model and inner optimizer a learned-loss file records, for each
    of them the command line did not choose (``given``: the keys it set; ``task=...`` chooses
    the task, ``experiment`` chooses them all). A value the command line sets inside such a
    group (``optim.lr=5e-4``) is applied over the file's, never a reason to drop it; likewise
    the recorded ``meta_test.task_overrides`` apply unless the command line sets them. The
    recorded ``target`` must be that of a config option of this run's sources, and its values
    keys of that option: the file chooses among configured components and their settings, it
    never names code. A file that does not record its setup is refused here, asking for
    ``task=`` on the command line."""
    if "experiment" in given:
        return cfg
    wanted = [g for g in SETUP_GROUPS if g not in given]
    inside = {g: sorted(k for k in given if k.startswith(g + ".")) for g in wanted}
    if not wanted:
        return cfg
    setup = meta.get("setup")
    if not isinstance(setup, Mapping) or not isinstance(setup.get("task"), Mapping):
        raise LearnedLossOtherTask(
            f"{source} does not record the task it was trained on (written before metaloss "
            f"recorded it; it says only task={meta.get('task')!r}), and the command line sets no "
            f"task: pass the task explicitly, e.g. task={meta.get('task') or '<name>'} "
            "(or experiment=<the experiment it came from>)"
        )
    command_line, cfg = cfg, cfg.copy()
    with open_dict(cfg):
        for group in wanted:
            rec = setup.get(group)
            if not isinstance(rec, Mapping):
                continue
            base = _option_for(group, rec, cfg, source)
            config = rec.get("config") or {}
            unknown = [k for k in config if k not in base]
            if unknown:
                # the option's keys are the names in its YAML file (OmegaConf types a key as
                # any DictKeyType: str, int, Enum, ...)
                keys = cast(list[str], [k for k in base if k != "_target_"])
                raise LearnedLossOtherTask(
                    f"{source}: unknown key 'meta.setup.{group}.config.{unknown[0]}' for "
                    f"{group} {rec.get('target')!r} (its keys: {sorted(keys)})"
                )
            cfg[group] = OmegaConf.merge(base, config)
            for key in inside[group]:  # the command line's own values win over the file's
                value = OmegaConf.select(command_line, key, default=_UNSET)
                if value is _UNSET:  # ~task.x: removed on the command line
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(cfg, parent)
                    if isinstance(node, DictConfig) and leaf in node:
                        node.pop(leaf)
                else:
                    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            log.info(
                "%s from %s: %s=%s %s",
                group,
                source,
                group,
                rec.get("option") or rec.get("target"),
                " ".join(f"{k}={_override_value(v)}" for k, v in config.items()),
            )
        sets_overrides = any(
            k == "meta_test" or k.startswith("meta_test.task_overrides") for k in given
        )
        if "task" in wanted and not sets_overrides and setup.get("task_overrides"):
            cfg.meta_test.task_overrides = dict(setup["task_overrides"])
    return cfg


def _option_for(group: str, rec: Mapping[str, Any], cfg: Any, source: str) -> DictConfig:
    """The config option of ``group`` the file's record describes: its recorded option name if
    that option still has the recorded ``_target_``, else, among the options with that target
    (``linear`` and ``mlp`` share one), the one that has every recorded key and the most
    recorded values."""
    name = _option_name(group, rec, cfg)
    if name is None:
        names = group_options(group, cfg)
        raise LearnedLossOtherTask(
            f"{source} was trained with {group} {rec.get('target')!r}, which no {group} option "
            f"of this run's config sources has ({', '.join(names)}); pass {group}=... explicitly"
        )
    return load_option(group, name, cfg)


def _option_name(group: str, rec: Mapping[str, Any], cfg: Any = None) -> str | None:
    target, name, config = rec.get("target"), rec.get("option"), dict(rec.get("config") or {})
    names = group_options(group, cfg)
    candidates = []
    for n in names:
        option = load_option(group, n, cfg)
        if option.get("_target_") != target:
            continue
        if n == name:
            return n
        values = cast(dict[str, Any], OmegaConf.to_container(option, resolve=True))  # a DictConfig
        fits = all(k in values for k in config)
        candidates.append((fits, sum(values.get(k, _UNSET) == v for k, v in config.items()), n))
    return max(candidates)[2] if candidates else None


def instantiate_loss(loss_cfg: Any, task: Any) -> Any:
    """Instantiate a loss config for a task, filling in ``num_classes`` / ``x_dim`` when the
    loss's constructor takes them and the config leaves them unset."""
    target = get_object(loss_cfg["_target_"])
    extra = {}
    if isinstance(target, type):
        params = inspect.signature(target).parameters
        if "num_classes" in params and loss_cfg.get("num_classes") is None:
            extra["num_classes"] = task.num_classes or 2
        if "x_dim" in params and loss_cfg.get("use_x", False) and loss_cfg.get("x_dim") is None:
            extra["x_dim"] = math.prod(task.in_shape)
    return instantiate(loss_cfg, **extra)


def loss_option(
    name: str, task: Any, cfg: Any = None, overrides: Mapping[str, Any] | None = None
) -> Any:
    """Instantiate the loss option ``<name>`` of the run's search path for a task (e.g. a
    baseline named in ``compare:``), refusing unknown names and losses that do not fit.
    ``overrides``: hyper-parameters set over the option's (tuned values, metaloss.tune)."""
    option: DictConfig | ListConfig = load_option("loss", name, cfg)
    if overrides:
        # values over the option's own, never code: a `_target_` (or `_partial_`, `_args_`...)
        # here would make Hydra call whatever a tuned.json names
        code = [
            k
            for k in overrides
            if not isinstance(k, str) or (k.startswith("_") and k.endswith("_"))
        ]
        if code:
            from metaloss.errors import ConfigError

            raise ConfigError(
                f"loss {name!r}: hyper-parameter overrides may not name code "
                f"({', '.join(map(str, code))}); only values are set over the loss option's own"
            )
        option = OmegaConf.merge(option, dict(overrides))
    loss = instantiate_loss(option, task)
    check_loss_fits(loss, task.kind, task.name, name)
    if isinstance(loss, torch.nn.Module) and hasattr(task, "x_train"):
        x = task.x_train  # a loss with parameters goes where the task's data is
        loss = loss.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    check_loss(loss, task, name, cfg)
    return loss


# The loss a task kind gets when none is chosen: metaloss-train's default loss and
# metaloss-meta's default validation objective (one table, so they never disagree).
# Per task kind, from the kinds registry (metaloss.kinds): the loss metaloss-train uses
# without loss=, the validation objective without meta.objective, the meta-test's baselines
# without compare:.
DEFAULT_LOSS = kinds.ByKind("default_loss")
DEFAULT_OBJECTIVE = DEFAULT_LOSS
DEFAULT_BASELINES = kinds.ByKind("baselines")


def baselines_for(
    names: Any, task: Any, cfg: Any = None, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The `compare:` losses, instantiated for the task (null: the defaults for its kind),
    from the run's config sources (``cfg``: see :func:`searchpath`); ``overrides``: per loss
    name, hyper-parameters set over its option's (tuned baselines)."""
    return {
        n: loss_option(n, task, cfg, (overrides or {}).get(n))
        for n in (names or DEFAULT_BASELINES[task.kind])
    }

"""Where the Hydra configs live, and the checks that read them (the only registry)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_repository import ConfigRepository
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from metaloss.losses.base import ParametricLoss, loss_kinds
from metaloss.runs import register_resolvers

register_resolvers()  # ${metaloss.uid:} / ${metaloss.slug:} in the run directories of conf/*.yaml


def conf_dir() -> Path:
    """The `conf/` directory: inside the package for a built wheel, at the repo top for a
    source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"metaloss configs not found next to {here} (looked for conf/train.yaml)")


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

_ACTIVE_SEARCHPATH: ContextVar[tuple[str, ...] | None] = ContextVar("metaloss_searchpath", default=None)


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
        return tuple(str(p) for p in (HydraConfig.get().get("searchpath") or ()))
    return ()


@contextmanager
def using_searchpath(cfg: Any) -> Iterator[tuple[str, ...]]:
    """Within the block, lookups without a ``cfg`` use ``cfg``'s search path (validation
    checks see single values, not the config they belong to)."""
    token = _ACTIVE_SEARCHPATH.set(searchpath(cfg))
    try:
        yield _ACTIVE_SEARCHPATH.get()
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
    return _search_path(searchpath(cfg))[1].get_group_options(group, results_filter=ObjectType.CONFIG)


def load_option(group: str, name: str, cfg: Any = None) -> DictConfig:
    """Option ``<group>/<name>`` exactly as ``<group>=<name>`` would compose it in this run:
    from the first source that has it; an option with its own defaults list is composed by
    Hydra's config loader."""
    sp, repo = _search_path(searchpath(cfg))
    path = f"{group}/{name}"
    if not isinstance(name, str) or not repo.config_exists(path):
        where = ", ".join(["conf/"] + [f"hydra.searchpath {p}" for p in searchpath(cfg)])
        raise UnknownOption(f"unknown {group} {name!r} (looked in {where}); valid: "
                            f"{', '.join(group_options(group, cfg))}")
    loaded = repo.load_config(path)
    if not any(not d.is_self() for d in loaded.defaults_list or ()):
        return loaded.config
    composed = ConfigLoaderImpl(config_search_path=sp).load_configuration(
        config_name=None, overrides=[f"+{group}={name}"], run_mode=RunMode.RUN, from_shell=False)
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
    return [n for n, t in _loss_catalogue(searchpath(cfg)).items()
            if isinstance(t, type) and issubclass(t, ParametricLoss)]


class LossDoesNotFitTask(ValueError):
    """Raised before training when the chosen loss cannot be used on the task."""


def check_loss_fits(loss: Any, task_kind: str, task_name: str, loss_name: str | None) -> None:
    """Fail early, naming the valid choices, when a loss does not fit the task kind."""
    kinds = loss_kinds(loss)
    if task_kind not in kinds:
        raise LossDoesNotFitTask(
            f"loss {loss_name or loss!r} fits {sorted(kinds)} tasks, but task {task_name!r} is "
            f"{task_kind}. Losses for {task_kind} tasks: {', '.join(losses_for(task_kind))}"
        )


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


def loss_option(name: str, task: Any, cfg: Any = None, overrides: Mapping[str, Any] | None = None) -> Any:
    """Instantiate the loss option ``<name>`` of the run's search path for a task (e.g. a
    baseline named in ``compare:``), refusing unknown names and losses that do not fit.
    ``overrides``: hyper-parameters set over the option's (tuned values, metaloss.tune)."""
    option = load_option("loss", name, cfg)
    if overrides:
        # values over the option's own, never code: a `_target_` (or `_partial_`, `_args_`...)
        # here would make Hydra call whatever a tuned.json names
        code = [k for k in overrides if not isinstance(k, str) or (k.startswith("_") and k.endswith("_"))]
        if code:
            raise ValueError(f"loss {name!r}: hyper-parameter overrides may not name code ({', '.join(map(str, code))}); "
                             "only values are set over the loss option's own")
        option = OmegaConf.merge(option, dict(overrides))
    loss = instantiate_loss(option, task)
    check_loss_fits(loss, task.kind, task.name, name)
    if isinstance(loss, torch.nn.Module):  # a loss with parameters goes where the task's data is
        x = task.x_train
        loss = loss.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    return loss


# The loss a task kind gets when none is chosen: metaloss-train's default loss and
# metaloss-meta's default validation objective (one table, so they never disagree).
DEFAULT_LOSS = {"regression": "mse", "classification": "ce", "binary": "ce", "segmentation": "dice"}
DEFAULT_OBJECTIVE = DEFAULT_LOSS
DEFAULT_BASELINES = {
    "regression": ["mse", "mae", "huber"],
    "classification": ["ce", "focal", "label_smoothing", "poly1"],
    "binary": ["ce", "weighted_ce", "focal"],
    "segmentation": ["dice", "iou", "bce_dice"],
}


def baselines_for(names: Any, task: Any, cfg: Any = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The `compare:` losses, instantiated for the task (null: the defaults for its kind),
    from the run's config sources (``cfg``: see :func:`searchpath`); ``overrides``: per loss
    name, hyper-parameters set over its option's (tuned baselines)."""
    return {n: loss_option(n, task, cfg, (overrides or {}).get(n)) for n in (names or DEFAULT_BASELINES[task.kind])}

"""Where the Hydra configs live, and the checks that read them (the only registry)."""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from metaloss.losses.base import loss_kinds
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


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. ``group_options("loss")``."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@lru_cache(maxsize=1)
def _loss_catalogue() -> dict[str, frozenset[str]]:
    """Option name -> task kinds, read from each ``conf/loss/*.yaml``'s ``_target_``."""
    out = {}
    for name in group_options("loss"):
        target = OmegaConf.load(conf_dir() / "loss" / f"{name}.yaml").get("_target_")
        try:
            out[name] = loss_kinds(get_object(target))
        except (TypeError, ImportError, AttributeError, ValueError):
            continue  # e.g. `learned`: its kinds come from the saved file
    return out


def losses_for(kind: str) -> list[str]:
    """Names of the catalogued losses that fit a task kind."""
    return [n for n, kinds in _loss_catalogue().items() if kind in kinds]


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


def loss_option(name: str, task: Any) -> Any:
    """Instantiate the catalogued loss ``conf/loss/<name>.yaml`` for a task (e.g. a baseline
    named in ``compare:``), refusing unknown names and losses that do not fit."""
    path = conf_dir() / "loss" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(group_options('loss'))}")
    loss = instantiate_loss(OmegaConf.load(path), task)
    check_loss_fits(loss, task.kind, task.name, name)
    return loss


DEFAULT_OBJECTIVE = {"regression": "mse", "classification": "ce", "binary": "ce", "segmentation": "dice"}
DEFAULT_BASELINES = {
    "regression": ["mse", "mae", "huber"],
    "classification": ["ce", "focal", "label_smoothing", "poly1"],
    "binary": ["ce", "weighted_ce", "focal"],
    "segmentation": ["dice", "iou", "bce_dice"],
}


def baselines_for(names: Any, task: Any) -> dict[str, Any]:
    """The `compare:` losses, instantiated for the task (null: the defaults for its kind)."""
    return {n: loss_option(n, task) for n in (names or DEFAULT_BASELINES[task.kind])}

"""Warm starts: a parametric family searched as a residual on a named baseline.

``loss=residual loss.base=logit_adjusted_ce loss.family=taylorglo`` is

    L_φ(pred, target) = base(pred, target) + f_φ(pred, target) − f_φ₀(pred, target)

where ``base`` is a fixed loss option (with ``base_params`` over its own: by default its tuned
values in ``meta_test.tuned``, ``${metaloss.tuned_params:...}``), ``f`` the parametric family
``family`` and φ₀ its initial parameters, kept as a frozen copy. At φ = φ₀ the loss *is* the
baseline, exactly, for any family; the search starts where the best known loss is and moves
only as far as the evidence (its outer objective) takes it. The zero-at-start residual is the
idea of zero-initialised residual branches (Goyal et al. 2017, "Accurate, large minibatch SGD";
Zhang et al. 2019, "Fixup initialization") applied to a loss.

It composes loss options by name (the config catalogue), so it lives beside
:mod:`metaloss.config`, above the engine's loss families.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call

from metaloss.config import load_option
from metaloss.losses.base import ParametricLoss, loss_kinds
from metaloss.schema import LOSS_RULES
from metaloss.tune import loss_param_problems


def _plain_values(params: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Settings over an option's own: values only, never a Hydra key naming code to call."""
    out = dict(params or {})
    code = [k for k in out if not isinstance(k, str) or (k.startswith("_") and k.endswith("_"))]
    if code:
        raise ValueError(f"{where}: keys {code} refused (values only, never code to call)")
    return out


_NAME = re.compile(r"\w+")  # an option name of the loss group, never a path to another group


def _option(name: str, role: str) -> tuple[DictConfig, Any]:
    """The loss option ``name`` and the object its ``_target_`` names, refused unless ``name``
    is a plain option name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"loss.{role} = {name!r}: must be the name of a loss option")
    option = load_option("loss", name)
    assert isinstance(option, DictConfig)  # a loss option is a mapping
    return option, get_object(str(option.get("_target_")))


def _family_param_problems(cls: type, params: dict[str, Any]) -> list[str]:
    """``loss.family_params``: constructor arguments of the family class, in the ranges
    metaloss.schema declares for it (the rules of ``loss.<key>=...`` on the command line)."""
    takes = inspect.signature(cls).parameters
    out = [
        f"loss.family_params.{k}: {cls.__name__} takes no such argument ({', '.join(takes)})"
        for k in params
        if k not in takes
    ]
    for k, check in LOSS_RULES.get(cls.__name__, {}).items():
        if k in params and (msg := check(params[k])):
            out.append(f"loss.family_params.{k} = {params[k]!r}: must be {msg}")
    return out


def _build(option: DictConfig, params: dict[str, Any], num_classes: int | None) -> Any:
    """``option`` with ``params`` over its own (``num_classes`` filled in if it takes it)."""
    merged = OmegaConf.merge(option, params)
    assert isinstance(merged, DictConfig)
    target = get_object(str(merged.get("_target_")))
    extra: dict[str, Any] = {}
    takes = inspect.signature(target).parameters if isinstance(target, type) else {}
    if "num_classes" in takes and merged.get("num_classes") is None and num_classes is not None:
        extra["num_classes"] = num_classes
    return instantiate(merged, **extra)


class Residual(ParametricLoss):
    """``base + f_φ − f_φ₀``: ``family``'s φ searched as a residual on the fixed loss ``base``
    (see the module docstring). ``num_classes``: passed to the family if it takes it (filled
    in from the task). Fits the task kinds both the base and the family fit."""

    def __init__(
        self,
        base: str = "ce",
        family: str = "taylorglo",
        base_params: Mapping[str, Any] | None = None,
        family_params: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
    ) -> None:
        base_values = _plain_values(base_params, "loss.base_params")
        family_values = _plain_values(family_params, "loss.family_params")
        super().__init__(
            base=base,
            family=family,
            base_params=base_values,
            family_params=family_values,
            num_classes=num_classes,
        )
        # Names and values only: a file (or a command line) picks among the installed loss
        # options and sets their numbers, never code, paths or nested files
        base_option, base_target = _option(base, "base")
        if isinstance(base_target, type) or not base_option.get("_partial_", False):
            raise ValueError(f"loss.base = {base!r}: must be a fixed loss (a loss function)")
        problems = loss_param_problems(str(base_option._target_), base_values, "loss.base_params")
        family_option, family_target = _option(family, "family")
        if not (isinstance(family_target, type) and issubclass(family_target, ParametricLoss)):
            raise ValueError(f"loss.family = {family!r}: must be a parametric loss")
        problems += _family_param_problems(family_target, family_values)
        if problems:  # tuned.json's rules for the base, the family's own for the family
            raise ValueError("; ".join(problems))
        self.base_loss = _build(base_option, base_values, num_classes)
        family_loss = _build(family_option, family_values, num_classes)
        self.family_loss = family_loss
        self.kinds = tuple(k for k in family_loss.kinds if k in loss_kinds(self.base_loss))
        if not self.kinds:
            raise ValueError(
                f"loss.base = {base!r} and loss.family = {family!r} fit no task kind in common"
            )
        self._names = [n for n, _ in family_loss.named_parameters()]
        for i, (_, p) in enumerate(family_loss.named_parameters()):
            self.register_buffer(f"phi0_{i}", p.detach().clone())

    def start(self) -> dict[str, torch.Tensor]:
        """φ₀: the family's parameters as they were when the search started."""
        return {n: getattr(self, f"phi0_{i}") for i, n in enumerate(self._names)}

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **context: Any) -> torch.Tensor:
        moved = self.family_loss(pred, target, **context)
        start = functional_call(self.family_loss, self.start(), (pred, target), context)
        return self.base_loss(pred, target, **context) + (moved - start)  # exact at φ = φ₀

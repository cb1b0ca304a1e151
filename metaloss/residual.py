"""Warm starts: a parametric family searched as a residual on a named baseline.

``loss=residual loss.base=logit_adjusted_ce loss.family=taylorglo`` is

    L_φ(pred, target) = base(pred, target) + f_φ(pred, target) − f_φ₀(pred, target)

where ``base`` is a fixed loss option (with ``base_params`` over its own: by default its tuned
values in ``meta_test.tuned``, ``${metaloss.tuned_params:...}``), ``f`` the parametric family
``family`` and φ₀ its initial parameters, kept as a frozen copy. With ``start_at_base`` the
family is built with the base's settings that it takes (the logit-adjusted family takes the
logit-adjusted loss's τ), and refused unless f_φ₀ then *is* the base on a probe batch: the
residual is the family at φ, never the base minus some other loss (which can reward a wrong
prediction: docs/meta.md). At φ = φ₀ the loss *is* the
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
from metaloss.losses.base import ParametricLoss, loss_context, loss_kinds
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


def _at_base(
    base: str,
    base_option: DictConfig,
    base_values: dict[str, Any],
    family: str,
    family_target: type,
    family_values: dict[str, Any],
) -> dict[str, Any]:
    """``family_values`` with the base's effective settings (its option's, under
    ``base_params``) that the family's constructor takes; refused if it takes none, or if
    ``family_params`` sets one of them to another value."""
    merged = OmegaConf.to_container(OmegaConf.merge(base_option, base_values), resolve=True)
    assert isinstance(merged, dict)
    settings = {k: v for k, v in merged.items() if isinstance(k, str) and not k.startswith("_")}
    takes = inspect.signature(family_target).parameters
    shared = {k: v for k, v in settings.items() if k in takes}
    if not shared:
        raise ValueError(
            f"loss.start_at_base = true: loss.family = {family!r} takes none of loss.base = "
            f"{base!r}'s settings ({', '.join(settings) or 'it has none'}), so it cannot be "
            "started at it"
        )
    clash = [k for k, v in shared.items() if k in family_values and family_values[k] != v]
    if clash:
        raise ValueError(
            f"loss.start_at_base = true sets loss.family_params.{clash[0]} to the base's "
            f"{shared[clash[0]]!r}; loss.family_params gives {family_values[clash[0]]!r}"
        )
    return {**family_values, **shared}


def _check_starts_at_base(
    base_loss: Any,
    family_loss: ParametricLoss,
    kinds: tuple[str, ...],
    num_classes: int | None,
    base: str,
    family: str,
) -> None:
    """Refuse a family that, built at the base's settings, is not the base at φ₀ (on a probe
    batch of the first task kind both fit, with uneven class counts)."""
    g = torch.Generator().manual_seed(0)
    kind = kinds[0]
    built_for = family_loss.init_kwargs.get("num_classes") or num_classes or 3
    classes = 2 if kind == "binary" else int(built_for)
    if kind not in ("classification", "binary", "regression"):
        raise ValueError(
            f"loss.start_at_base = true is checked on classification, binary and regression "
            f"losses; {base!r} and {family!r} fit {', '.join(kinds)}"
        )
    if kind in ("classification", "binary"):
        pred = torch.randn(16, 1 if kind == "binary" else classes, generator=g) * 3
        target = torch.randint(0, classes, (16,), generator=g)
    else:
        pred, target = torch.randn(16, 1, generator=g), torch.randn(16, 1, generator=g)
    context = loss_context(torch.arange(1.0, classes + 1) ** 2, None, 0.5)
    with torch.no_grad():
        want, got = base_loss(pred, target, **context), family_loss(pred, target, **context)
    if not torch.allclose(want, got, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"loss.start_at_base = true: loss.family = {family!r} at the settings it took from "
            f"{base!r} is not {base!r} at its start (largest difference "
            f"{float((want - got).abs().max()):.3g} on a probe batch); set start_at_base=false"
        )


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
        start_at_base: bool = False,
    ) -> None:
        base_values = _plain_values(base_params, "loss.base_params")
        family_values = _plain_values(family_params, "loss.family_params")
        if not isinstance(start_at_base, bool):
            raise ValueError(f"loss.start_at_base = {start_at_base!r}: must be true or false")
        super().__init__(
            base=base,
            family=family,
            base_params=base_values,
            family_params=family_values,
            num_classes=num_classes,
            start_at_base=start_at_base,
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
        if start_at_base and not problems:
            family_values = _at_base(
                base, base_option, base_values, family, family_target, family_values
            )
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
        if start_at_base:
            _check_starts_at_base(
                self.base_loss, family_loss, self.kinds, num_classes, base, family
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

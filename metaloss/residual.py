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
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call

from metaloss.config import load_option
from metaloss.losses.base import ParametricLoss, loss_kinds
from metaloss.tune import loss_param_problems


def _plain_values(params: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Settings over an option's own: values only, never a Hydra key naming code to call."""
    out = dict(params or {})
    code = [k for k in out if not isinstance(k, str) or (k.startswith("_") and k.endswith("_"))]
    if code:
        raise ValueError(f"{where}: keys {code} refused (values only, never code to call)")
    return out


def _build(name: str, params: dict[str, Any], num_classes: int | None) -> Any:
    """The loss option ``name`` (the running app's search path) with ``params`` over its own."""
    option = OmegaConf.merge(load_option("loss", name), params)
    assert isinstance(option, DictConfig)  # a loss option is a mapping
    target = get_object(str(option.get("_target_")))
    extra: dict[str, Any] = {}
    takes = inspect.signature(target).parameters if isinstance(target, type) else {}
    if "num_classes" in takes and option.get("num_classes") is None and num_classes is not None:
        extra["num_classes"] = num_classes
    return instantiate(option, **extra)


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
        target = str(load_option("loss", base).get("_target_"))
        problems = loss_param_problems(target, base_values, "loss.base_params")
        if problems:  # the tuned.json rules: searched hyper-parameters, in their valid ranges
            raise ValueError("; ".join(problems))
        self.base_loss = _build(base, base_values, num_classes)
        if isinstance(self.base_loss, torch.nn.Module) and any(self.base_loss.parameters()):
            raise ValueError(f"loss.base = {base!r}: must be a fixed loss (no parameters)")
        family_loss = _build(family, family_values, num_classes)
        if not isinstance(family_loss, ParametricLoss):
            raise ValueError(f"loss.family = {family!r}: must be a parametric loss")
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
        return self.base_loss(pred, target, **context) + moved - start

"""The lowest layer of the settings schema: value checkers and the loss hyper-parameters' rules.

A checker is a function of one value that returns None when the value is valid, else what a
valid value looks like (``integer(1)(0) == "an integer >= 1"``). :mod:`metaloss.validate`
checks a whole composed config with them (its ``RULES``), :mod:`metaloss.tune` the values of a
tuned.json, :mod:`metaloss.losses.io` the settings of a saved loss; :data:`LOSS_RULES` is the
single table of every loss's valid hyper-parameter values. Imports nothing of metaloss, so any
of them can import it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

Check = Callable[[Any], "str | None"]  # None: valid; else what a valid value looks like


# ---------------------------------------------------------------- value checkers


def is_int(v: Any) -> TypeGuard[int]:
    """An integer (NumPy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> TypeGuard[float]:
    """A finite real number (an integer too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def integer(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Check:
    def check(v):
        if v is None and optional:
            return None
        if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = (
                (f">= {lo}" if hi is None else f"in [{lo}, {hi}]") if lo is not None else f"<= {hi}"
            )
            return f"an integer {rng}" + (" or null" if optional else "")
        return None

    return check


def real(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> Check:
    def check(v):
        if v is None and optional:
            return None
        bad = not is_real(v)
        if not bad and lo is not None:
            bad = v <= lo if lo_open else v < lo
        if not bad and hi is not None:
            bad = v >= hi if hi_open else v > hi
        if bad:
            if lo is not None and hi is not None:
                rng = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            elif lo is not None:
                rng = f"{'>' if lo_open else '>='} {lo}"
            elif hi is not None:
                rng = f"{'<' if hi_open else '<='} {hi}"
            else:
                rng = "(finite)"
            return f"a number {rng}" + (" or null" if optional else "")
        return None

    return check


def positive(*, optional: bool = False) -> Check:
    return real(0, lo_open=True, optional=optional)


def boolean() -> Check:
    return lambda v: None if isinstance(v, bool) else "true or false"


def one_of(*choices: Any, optional: bool = False) -> Check:
    def check(v):
        if (v is None and optional) or v in choices:
            return None
        return "one of " + ", ".join(map(str, choices)) + (" or null" if optional else "")

    return check


def int_list(
    lo: int = 1, *, optional: bool = False, nonempty: bool = False, hi: int | None = None
) -> Check:
    def check(v):
        if v is None and optional:
            return None
        ok = isinstance(v, list | tuple) and all(
            is_int(x) and x >= lo and (hi is None or x <= hi) for x in v
        )
        if not ok or (nonempty and not v):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            return f"a {'non-empty ' if nonempty else ''}list of integers {rng}" + (
                " or null" if optional else ""
            )
        return None

    return check


def interval(*, strict: bool = False, lo: float | None = None, lo_open: bool = False) -> Check:
    """A ``[low, high]`` pair with low <= high (low < high if ``strict``)."""

    def check(v):
        ok = (
            isinstance(v, list | tuple)
            and len(v) == 2
            and all(is_real(x) for x in v)
            and (v[0] < v[1] if strict else v[0] <= v[1])
        )
        if ok and lo is not None:
            ok = v[0] > lo if lo_open else v[0] >= lo
        if not ok:
            bound = "" if lo is None else f", both {'>' if lo_open else '>='} {lo}"
            return f"a pair [low, high] with low {'<' if strict else '<='} high{bound}"
        return None

    return check


def unit_pair() -> Check:
    """Adam-style ``betas``: two numbers in [0, 1)."""

    def check(v):
        if (
            isinstance(v, list | tuple)
            and len(v) == 2
            and all(is_real(x) and 0 <= x < 1 for x in v)
        ):
            return None
        return "a pair of numbers in [0, 1)"

    return check


def text(optional: bool = False) -> Check:
    return lambda v: (
        None
        if isinstance(v, str) or (v is None and optional)
        else ("a string" + (" or null" if optional else ""))
    )


def existing_path(optional: bool = False, *, file: bool = False) -> Check:
    def check(v):
        if v is None and optional:
            return None
        p = Path(v).expanduser() if isinstance(v, str) else None
        if p is None or not (p.is_file() if file else p.exists()):
            return ("an existing file" if file else "an existing file or directory") + (
                " or null" if optional else ""
            )
        return None

    return check


def learned_loss_source() -> Check:
    """A learned-loss file, or a W&B artifact reference (fetched and checked on loading)."""
    is_file = existing_path(file=True)
    return lambda v: (
        None
        if isinstance(v, str) and v.startswith("wandb-artifact://")
        else (
            is_file(v)
            and "an existing file or a wandb-artifact://[entity/]project/name:version reference"
        )
    )


def reals(optional: bool = False) -> Check:
    def check(v):
        if (v is None and optional) or (isinstance(v, list | tuple) and all(is_real(x) for x in v)):
            return None
        return "a list of finite numbers" + (" or null" if optional else "")

    return check


def strings(optional: bool = False) -> Check:
    def check(v):
        if (v is None and optional) or (
            isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)
        ):
            return None
        return "a list of strings" + (" or null" if optional else "")

    return check


def classes() -> Check:
    """``positive_classes`` of a 10-class task: distinct digits that leave a negative class."""
    inner = int_list(0, hi=9, optional=True, nonempty=True)

    def check(v):
        msg = inner(v)
        if msg:
            return msg
        if v is not None and (len(set(v)) != len(v) or len(v) >= 10):
            return "distinct digits in [0, 9] that leave at least one digit for the negative class"
        return None

    return check


def mapping() -> Check:
    return lambda v: None if isinstance(v, dict) else "a mapping {key: value}"


# ---------------------------------------------------------------- loss hyper-parameters

# Loss hyper-parameters, by the loss function's / class's name (the last part of _target_).
LOSS_RULES: dict[str, dict[str, Check]] = {
    "huber": {"delta": positive()},
    "smooth_l1": {"beta": positive()},
    "quantile": {"tau": real(0, 1, lo_open=True, hi_open=True)},
    "poisson": {"eps": positive(), "log_input": boolean()},
    "bce": {"pos_weight": positive(optional=True)},
    "weighted_ce": {
        "scheme": one_of("inverse", "balanced", "effective"),
        "beta": real(0, 1, hi_open=True),
    },
    "label_smoothing": {"epsilon": real(0, 1, hi_open=True)},
    "focal": {"gamma": real(0), "alpha": real(0, 1, optional=True)},
    "class_balanced_focal": {"gamma": real(0), "beta": real(0, 1, hi_open=True)},
    "poly1": {"epsilon": real(-1)},
    "hinge": {"margin": positive()},
    "squared_hinge": {"margin": positive()},
    "gce": {"q": real(0, 1, lo_open=True)},
    "dice": {"smooth": real(0)},
    "iou": {"smooth": real(0)},
    "tversky": {"alpha": real(0), "beta": real(0), "smooth": real(0)},
    "focal_tversky": {"alpha": real(0), "beta": real(0), "gamma": positive(), "smooth": real(0)},
    "bce_dice": {"bce_weight": real(0), "smooth": real(0)},
    "contrastive": {"pos_margin": real(0, 2), "neg_margin": real(0, 2)},
    "triplet": {"margin": real(0, 2), "mining": one_of("all", "batch_hard")},
    "multi_similarity": {"alpha": positive(), "beta": positive(), "base": real(-1, 1)},
    "prototype": {"temperature": positive()},
    "LearnedPairLoss": {
        "alpha": positive(),
        "beta": positive(),
        "lam_pos": real(-1, 1),
        "lam_neg": real(-1, 1),
    },
    "ML3Loss": {
        "hidden": int_list(1, nonempty=True, hi=4096),
        "num_classes": integer(1, 100_000, optional=True),
        "fit_to": one_of("ce", "mse", optional=True),
        "fit_steps": integer(1),
        "init": one_of("default", "xavier"),
        "init_scale": positive(),
        "bias": boolean(),
        "use_x": boolean(),
        "use_progress": boolean(),
    },
    "TaylorGLO": {
        "init": one_of("ce", "mse", "brier", "zeros"),
        "center_target": real(),
        "center_pred": real(),
    },
    "SymbolicLoss": {
        "expression": text(),
        "max_nodes": integer(1, 1023),
        "max_constants": integer(0, 256),
    },
    "PolyN": {"degree": integer(1, 64), "init_epsilon": reals(optional=True)},
    "LogitAdjusted": {"num_classes": integer(2, 100_000, optional=True), "tau": real(0)},
    "AdaptiveRobust": {
        "init_alpha": real(0, 2, lo_open=True, hi_open=True),
        "init_scale": positive(),
        "alpha_min": positive(),
    },
    "LearnedSmoothing": {
        "init_epsilon": real(0, 1, lo_open=True, hi_open=True),
        "eps_max": real(0, 1, lo_open=True, hi_open=True),
        "per_class": boolean(),
        "num_classes": integer(2, 100_000, optional=True),
    },
    "logit_adjusted_ce": {"tau": real(0)},
    "symmetric_ce": {"alpha": real(0), "beta": real(0), "log_zero": real(hi=0, hi_open=True)},
    "LearnedTversky": {
        "init_alpha": positive(),
        "init_beta": positive(),
        "init_gamma": positive(),
        "init_w": real(0, 1, lo_open=True, hi_open=True),
        "scale": positive(),
        "smooth": real(0),
    },
    "load_learned_loss": {
        "path": learned_loss_source(),
        "frozen": boolean(),
        "allow_other_task": boolean(),
    },
}

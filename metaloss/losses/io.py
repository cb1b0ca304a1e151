"""Save a learned loss to a file and load it back safely (``torch.load(weights_only=True)``).

The file holds only tensors and plain values: the class path, its constructor arguments
and the state dict. Loading checks that the class is a :class:`ParametricLoss` before
building it, so a file cannot make us call arbitrary code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import get_class

from metaloss.losses.base import ParametricLoss

FORMAT = "metaloss.learned_loss/1"


class CorruptLossFile(ValueError):
    """The file is not a readable metaloss learned-loss file."""


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file, then rename: a crash never leaves a half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_learned_loss(loss: ParametricLoss, path: str | Path, **meta) -> Path:
    cls = type(loss)
    return atomic_save({
        "format": FORMAT,
        "target": f"{cls.__module__}.{cls.__qualname__}",
        "init_kwargs": dict(loss.init_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in loss.state_dict().items()},
        "meta": meta,
    }, path)


def load_learned_loss(path: str | Path, frozen: bool = True) -> ParametricLoss:
    """Rebuild a saved learned loss; ``frozen`` turns off gradients for its parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"learned loss file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, foreign objects
        raise CorruptLossFile(f"{path} is not a readable learned-loss file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CorruptLossFile(f"{path} is not a metaloss learned-loss file (format {FORMAT!r} expected)")
    try:
        cls = get_class(blob["target"])
    except Exception as e:
        raise CorruptLossFile(f"{path}: loss class {blob['target']!r} cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, ParametricLoss)):
        raise CorruptLossFile(f"{path}: {blob['target']!r} is not a ParametricLoss")
    try:
        loss = cls.from_saved(blob["init_kwargs"], blob["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise CorruptLossFile(f"{path}: parameters do not match {blob['target']}: {e}") from e
    if frozen:
        loss.requires_grad_(False)
    loss.meta = blob.get("meta", {})
    return loss

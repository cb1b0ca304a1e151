"""Checkpoints of meta-training: what evolves during a run (:class:`RunState`), captured at
step boundaries, and continuing a run from its checkpoint (:func:`resume`) only when the
checkpoint belongs to it (the same run identity, :mod:`metaloss.keys`).

The orchestration layer (below the CLI): the CLI writes checkpoints (inside its signal
guard) and calls :func:`resume`; nothing here knows about the command line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from metaloss.meta import OnlineState
from metaloss.outer import OuterOptimizer
from metaloss.runs import (
    ResumeMismatch,
    atomic_write,
    describe,
    differences,
    fingerprint,
    split_applied,
    stored_archive_problem,
)

log = logging.getLogger("metaloss")
CKPT_FORMAT = "metaloss.checkpoint/2"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run's loss."""


def load_checkpoint(path: Path) -> dict:
    problem = stored_archive_problem(path)
    if problem:
        raise CorruptCheckpoint(
            f"{path} is not a checkpoint metaloss wrote: {problem}; delete it or set "
            "meta.resume_from to another one"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpoint(
            f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it or "
            "set meta.resume_from to another one"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CorruptCheckpoint(
            f"{path} is not a metaloss checkpoint of format {CKPT_FORMAT} (older "
            "checkpoints carry no fingerprint, so they cannot prove which run they belong to)"
        )
    return ckpt


class RunState:
    """Everything that evolves during meta-training — φ and the meta-optimizer, the sampling
    RNG, torch's global RNG, the hypergradient method's own state (ES noise counter) and,
    online, the base model — captured together at step boundaries."""

    def __init__(
        self,
        learner: OuterOptimizer,
        gen: torch.Generator,
        hypergrad,
        online: OnlineState | None,
        ident: dict,
    ) -> None:
        self.learner, self.gen, self.hypergrad, self.online, self.ident = (
            learner,
            gen,
            hypergrad,
            online,
            ident,
        )
        self.fingerprint = fingerprint(ident)  # once: capture() runs after every step
        # φ kept for held-out selection (metaloss.selection), by outer step: never changed
        # once taken, so a capture shares them
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def capture(self, step: int) -> dict:
        return {
            "format": CKPT_FORMAT,
            "step": step,
            "fingerprint": self.fingerprint,
            "identity": self.ident,
            "learner": self.learner.state_dict(),
            "rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "hypergrad": self.hypergrad.state_dict()
            if hasattr(self.hypergrad, "state_dict")
            else None,
            "online": None if self.online is None else self.online.state_dict(),
            "snapshots": dict(self.snapshots),
        }

    def restore(self, ckpt: dict) -> None:
        self.learner.load_state_dict(ckpt["learner"])
        self.gen.set_state(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if hasattr(self.hypergrad, "load_state_dict") and ckpt.get("hypergrad") is not None:
            self.hypergrad.load_state_dict(ckpt["hypergrad"])
        if self.online is not None:
            self.online.load_state_dict(ckpt["online"])
        self.snapshots = {int(k): v for k, v in (ckpt.get("snapshots") or {}).items()}


def resume(cfg: DictConfig, out_dir: Path, state: RunState, make_meta_optimizer: Any) -> int:
    """Continue from ``meta.resume_from`` (a checkpoint or its run dir) or from this run
    directory's own checkpoint; return the completed outer steps (0: fresh).

    The checkpoint must have been made by a run with the same identity (config minus the
    keys that may change on resume). An explicit ``meta.resume_from`` may change the meta
    optimizer's hyper-parameters, clipping and the NaN patience: those are applied from the
    resumed step on, and logged. Any other difference is refused, naming the keys."""
    explicit = cfg.meta.resume_from is not None
    own = out_dir / "checkpoint.pt"
    resume = Path(cfg.meta.resume_from).expanduser() if explicit else own
    if resume.is_dir():
        resume = resume / "checkpoint.pt"
    if explicit and not resume.is_file():
        raise FileNotFoundError(f"meta.resume_from: no checkpoint at {resume}")
    if explicit and own.is_file() and own.resolve() != resume.resolve():
        # the same command again: this run was started from resume_from before and has
        # progressed since; its own checkpoint (same identity, checked below) continues it
        log.info(
            "%s has its own checkpoint: continuing it rather than starting again from %s",
            out_dir,
            resume,
        )
        resume = own
    if not resume.is_file():
        return 0
    ckpt = load_checkpoint(resume)
    diff = differences(ckpt.get("identity") or {}, state.ident)
    applied, refused = split_applied(diff)
    if refused or (applied and not explicit):
        raise ResumeMismatch(
            f"checkpoint {resume} was made by a run with another configuration: "
            f"{describe(refused or applied)}. "
            + (
                "Nothing was run. Resume with the settings it was made with, or start a fresh run."
                if refused
                else "To continue it with these new settings, pass meta.resume_from=" + str(out_dir)
            )
        )
    step = int(ckpt["step"])
    if step > cfg.meta.steps:
        raise ResumeMismatch(
            f"checkpoint {resume} is at outer step {step}, past meta.steps={cfg.meta.steps}: "
            f"set meta.steps >= {step} to continue it"
        )
    try:
        state.restore(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CorruptCheckpoint(f"{resume} does not match this loss/optimizer: {e}") from e
    changed = state.learner.apply_hyperparameters(make_meta_optimizer)
    if applied:
        log.warning(
            "resuming with changed settings, applied from outer step %d on: %s",
            step,
            describe(applied),
        )
    elif changed:  # identity matched, so this can only be a default changed in the code
        log.warning("meta-optimizer hyper-parameters applied on resume: %s", changed)
    log.info("resumed from %s at outer step %d", resume, step)
    return step


def save_checkpoint(path: Path, snapshot: dict) -> None:
    """Write ``snapshot`` (:meth:`RunState.capture`) to ``path`` atomically: a reader sees the
    previous checkpoint or this one, never a part."""
    atomic_write(path, lambda tmp: torch.save(snapshot, tmp))

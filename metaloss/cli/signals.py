"""SIGTERM and Ctrl-C as exceptions the entry points can clean up after.

SLURM, docker and ``kill`` send SIGTERM, which by default ends Python at once: nothing
saved, the W&B run left open. Inside :func:`interruptible` both SIGTERM and SIGINT raise
:class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread, so the run's
``except``/``finally`` blocks write the checkpoint of the last completed step and finish
the logger. Inside :func:`critical` (writing a checkpoint) a signal is held back and
raised when the section ends, so a second Ctrl-C cannot cut the save short.
SIGKILL cannot be caught; the periodic checkpoint covers it.

Inside a submitit job (SLURM through hydra-submitit-launcher) SIGTERM is different: some
clusters preempt with SIGTERM followed by SIGUSR2, and submitit requeues the job on
SIGUSR2. There SIGTERM only *requests a checkpoint* at the next step boundary
(:func:`checkpoint_requested`) and the run carries on until submitit's SIGUSR2 handler
requeues it, or the scheduler kills it, having lost nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_HANDLED = (signal.SIGTERM, signal.SIGINT)
_state = {"depth": 0, "pending": None, "active": False, "checkpoint": False}
log = logging.getLogger("metaloss")


def in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ


def checkpoint_requested() -> bool:
    """True once after a SIGTERM inside a submitit job: save a checkpoint now."""
    asked, _state["checkpoint"] = _state["checkpoint"], False
    return asked


class Interrupted(KeyboardInterrupt):
    """The process received ``signum``; the exit status should be ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _handler(signum, _frame) -> None:
    if signum == signal.SIGTERM and in_submitit_job():
        _state["checkpoint"] = True  # submitit requeues on the SIGUSR2 that follows
        log.warning("SIGTERM in a submitit job: checkpointing at the next step, then waiting for requeue")
        return
    if _state["depth"] > 0:
        _state["pending"] = signum  # raise it once the critical section ends
        return
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into :class:`Interrupted` for the duration (main thread only:
    elsewhere, e.g. in a launcher's worker thread, signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread() or _state["active"]:
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in _HANDLED}
    _state["active"] = True
    try:
        yield
    finally:
        _state["active"] = False
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def critical() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back while the block runs; raise the held one afterwards."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            raise Interrupted(signum)


@contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """In a console script: leave with status 128 + signal number (143 for SIGTERM, 130 for
    Ctrl-C), the shell convention schedulers read, after the run has saved its work."""
    try:
        yield
    except Interrupted as e:
        raise SystemExit(128 + e.signum) from e


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _forward_sigterm(signum, _frame) -> None:
    """The launching process of a multirun (joblib's workers are its children): pass
    SIGTERM on, so every job checkpoints and finishes its logger, then leave with 143."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    raise Interrupted(signum)


def console(hydra_main) -> None:
    """Run a ``@hydra.main`` app as a console script: SIGTERM reaches parallel jobs too,
    and the exit status is 128 + signal number after an interruption."""
    if threading.current_thread() is threading.main_thread() and not in_submitit_job():
        signal.signal(signal.SIGTERM, _forward_sigterm)
    with exit_on_interrupt():
        hydra_main()

"""SIGTERM and Ctrl-C as exceptions the entry points can clean up after.

SLURM, docker and ``kill`` send SIGTERM, which by default ends Python at once: nothing
saved, the W&B run left open. Inside :func:`interruptible` both SIGTERM and SIGINT raise
:class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread, so the run's
``except``/``finally`` blocks write the checkpoint of the last completed step and finish
the logger. Inside :func:`critical` (writing a checkpoint) a signal is held back and
raised when the section ends, so a second Ctrl-C cannot cut the save short.
SIGKILL cannot be caught; the periodic checkpoint covers it.

The launching process of a multirun (joblib, submitit's local executor) stops its jobs on
SIGTERM or Ctrl-C (:func:`stop_jobs`): each job gets the signal that makes it save its
checkpoint, the launcher waits for them (``$METALOSS_STOP_TIMEOUT_S``, default 60 s; a
second signal kills them at once), then leaves with 143 / 130 and nothing left running.
A joblib worker whose job was stopped ends instead of taking the sweep's next job.

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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_HANDLED = (signal.SIGTERM, signal.SIGINT)
_LAUNCHER_ENV = "METALOSS_LAUNCHER_PID"  # set by console(), inherited by a local sweep's jobs
_state: dict = {
    "depth": 0,
    "pending": None,
    "active": False,
    "checkpoint": False,
    "stopping": False,
    "raised_at": float("-inf"),
}
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
        log.warning(
            "SIGTERM in a submitit job: checkpointing at the next step, then waiting for requeue"
        )
        return
    now = time.monotonic()
    if now - float(_state["raised_at"]) < _ECHO_S:
        # The same stop delivered twice (a terminal's Ctrl-C reaches the job and its launcher,
        # which passes it on): the clean-up of the first one runs on. A later one interrupts it.
        return
    if _state["depth"] > 0:
        _state["pending"] = signum  # raise it once the critical section ends
        return
    _state["raised_at"] = now
    raise Interrupted(signum)


_ECHO_S = 1.0


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into :class:`Interrupted` for the duration (main thread only:
    elsewhere, e.g. in a launcher's worker thread, signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread() or _state["active"]:
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in _HANDLED}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _resend_if_swallowed(previous_hook)
    _state["active"] = True
    stop_watch = _watch_launcher()
    try:
        yield
    finally:
        stop_watch.set()
        _state["active"] = False
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def _resend_if_swallowed(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    """An unraisable-exception hook that sends a swallowed stop again.

    Python runs a signal handler between any two bytecodes of the main thread, also inside
    a weakref callback, a ``__del__`` or a GC callback; an exception raised there is
    *ignored* (printed as "Exception ignored in ...") and the run would carry on as if the
    SIGTERM had never come: seen as a run that ignored ``kill`` about 1 time in 12, its
    handler having fired inside ``WeakKeyDictionary``'s callback. The stop is sent again,
    to be raised outside the callback: from a helper thread a moment later, since a signal
    sent from inside this hook would fire inside it, where an exception is ignored too."""

    def hook(unraisable: Any) -> None:
        stop = unraisable.exc_value
        if not isinstance(stop, Interrupted):
            previous(unraisable)
            return
        _state["raised_at"] = float("-inf")  # not an echo: the first one never arrived
        main = threading.main_thread().ident or 0

        def resend() -> None:
            time.sleep(0.02)
            signal.pthread_kill(main, stop.signum)

        threading.Thread(target=resend, name="metaloss-resend-stop", daemon=True).start()

    return hook


def _launcher_pid() -> int | None:
    """The pid of the local launching process of this job (a joblib worker or a job of
    submitit's *local* executor), None elsewhere (a single run; SLURM jobs, whose launcher
    may end by design and lives on another machine)."""
    parent = os.environ.get(_LAUNCHER_ENV, "")
    local = not in_submitit_job() or os.environ.get("SUBMITIT_EXECUTOR") == "local"
    if not parent.isdigit() or int(parent) == os.getpid() or not local:
        return None
    return int(parent)


def _watch_launcher(every_s: float = 1.0) -> threading.Event:
    """In a local sweep's job: if the launching process disappears (``kill -9``, a crash),
    stop this job as Ctrl-C would (checkpoint, then exit) instead of running on unwatched."""
    done = threading.Event()
    launcher = _launcher_pid()
    if launcher is None:
        return done

    def watch() -> None:
        while not done.wait(every_s):
            if _gone(launcher):
                log.error("the launching process (pid %d) is gone: stopping this job", launcher)
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=watch, name="metaloss-launcher-watch", daemon=True).start()
    return done


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
    except Exception as e:
        # In the console script's own process (a single run, or a multirun's basic launcher):
        # a refused setting is reported here, before Hydra wraps it. Launcher workers let it
        # travel to the launching process, which reports it (console()).
        status = error_status(e) if os.environ.get(_LAUNCHER_ENV) == str(os.getpid()) else None
        if status is None or _state.get("full"):
            raise
        _report(e)
        raise SystemExit(status) from None
    except Interrupted as e:
        if _in_launcher_worker():
            # A joblib worker would take the sweep's next job after this one: the user
            # stopped the sweep, so the worker ends here, its job's clean-up done.
            _leave_worker(128 + e.signum)
        raise SystemExit(128 + e.signum) from e


def _leave_worker(status: int) -> None:
    for h in logging.getLogger().handlers + log.handlers:
        try:
            h.flush()
        except Exception:
            pass
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        try:
            wandb.teardown()  # its service process would otherwise outlive this worker
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    # Done, but not gone yet: loky takes a worker that exits for a broken pool and SIGKILLs
    # the others, which may still be saving their checkpoints. So this worker marks itself
    # done (its name, /proc/<pid>/comm) and waits; the launcher kills the done workers once
    # every job is done (stop_jobs). Should the launcher vanish meanwhile, it leaves at once.
    try:
        _set_process_name(_DONE_NAME)
        launcher = _launcher_pid()
        while launcher is not None and not _gone(launcher):
            time.sleep(0.05)
    except BaseException:
        pass
    os._exit(status)


_DONE_NAME = "metaloss-done"


def _set_process_name(name: str) -> None:
    """The calling thread's name in /proc/<pid>/comm (Linux prctl PR_SET_NAME; elsewhere a
    no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (no such process, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process (Linux /proc; empty elsewhere)."""
    out: dict[int, tuple[int, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(entry)] = (int(fields[1]), fields[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _descendants(root: int, procs: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """Process ids below ``root``, parents before their children (Linux /proc; empty elsewhere)."""
    procs = _processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ignores(pid: int, signum: int) -> bool:
    """Whether ``pid`` ignores ``signum`` (SigIgn in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


_SUBMITIT_CONTROLLER = "submitit.local._local"
_LOKY_WORKER = "loky.backend.popen_loky_posix"
STOP_TIMEOUT_ENV = "METALOSS_STOP_TIMEOUT_S"
DEFAULT_STOP_TIMEOUT_S = 60.0


def _stop_timeout() -> float:
    try:
        value = float(os.environ.get(STOP_TIMEOUT_ENV, DEFAULT_STOP_TIMEOUT_S))
    except ValueError:
        value = DEFAULT_STOP_TIMEOUT_S
    return value if value >= 0 else DEFAULT_STOP_TIMEOUT_S


def _job_targets(procs: dict[int, tuple[int, str]]) -> dict[int, int]:
    """The job processes of this (launching) process and the signal that stops each one
    with a checkpoint: {pid: signal}.

    * joblib's loky workers (children running ``...loky...popen_loky_posix``): SIGTERM;
    * submitit's local executor starts a controller per job (``python -m
      submitit.local._local``) that starts the job: the job gets SIGINT, because inside a
      submitit job SIGTERM only asks for a checkpoint (SLURM's preemption protocol). The
      controller is left alone (SIGINT would make it SIGKILL its job a second later); it
      ends by itself once its job has ended.

    Other children are no jobs and are left alone: resource trackers end with this process,
    and helpers such as the ``pgrep`` loky runs must not be cut short.
    """
    me = os.getpid()
    targets: dict[int, int] = {}
    for pid, (ppid, state) in procs.items():
        if ppid != me or state == "Z":
            continue
        cmd = _cmdline(pid)
        if _SUBMITIT_CONTROLLER in cmd:
            for job, (jppid, jstate) in procs.items():
                if jppid == pid and jstate != "Z":
                    # a job still starting ignores SIGINT (metaloss.cli.launchers): nothing to
                    # save yet
                    targets[job] = signal.SIGKILL if _ignores(job, signal.SIGINT) else signal.SIGINT
        elif _LOKY_WORKER in cmd:
            targets[pid] = signal.SIGTERM
    return targets


def _alive(pid: int, procs: dict[int, tuple[int, str]]) -> bool:
    """A job still at work: running, not a zombie, not a worker done with its clean-up."""
    return pid in procs and procs[pid][1] != "Z" and _process_name(pid) != _DONE_NAME


def stop_jobs(timeout: float | None = None) -> list[int]:
    """Stop every job this process launched and wait for them: each job gets the signal
    that makes it save its checkpoint and finish its logger (:func:`_job_targets`), jobs
    that appear meanwhile (a launch in progress) get it too; whatever has not ended after
    ``timeout`` seconds (default ``$METALOSS_STOP_TIMEOUT_S`` or 60) is killed with SIGKILL,
    with everything below it. Returns the pids that had to be killed."""
    timeout = _stop_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    signalled: set[int] = set()
    while True:
        procs = _processes()
        targets = _job_targets(procs)
        for pid, signum in targets.items():
            if pid not in signalled:
                signalled.add(pid)
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
        # done when no job and no submitit controller is left (resource trackers end with us)
        waiting = [p for p in targets if _alive(p, procs)]
        waiting += [
            p
            for p in _descendants(os.getpid(), procs)
            if _alive(p, procs) and _SUBMITIT_CONTROLLER in _cmdline(p)
        ]
        if not waiting:  # every job saved its work: the workers waiting to be let go are ended
            for pid in targets:
                if pid in procs and _process_name(pid) == _DONE_NAME:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            return []
        if time.monotonic() >= deadline:
            return _kill_trees(waiting, procs)
        time.sleep(0.05)


def _kill_trees(
    roots: list[int], procs: dict[int, tuple[int, str]], why: str | None = None
) -> list[int]:
    killed = []
    for root in roots:
        for pid in [root, *_descendants(root, procs)]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    if killed:
        why = why or (
            f"they did not stop within {_stop_timeout():g} s of the signal "
            f"({STOP_TIMEOUT_ENV}=<seconds> waits longer)"
        )
        log.error(
            "killed %d job process(es): %s; they keep their last periodic checkpoint",
            len(killed),
            why,
        )
    return killed


def _stop_handler(signum, _frame) -> None:
    """The launching process of a multirun (and any console script outside its run): stop
    the jobs, each saving its checkpoint, wait for them, then leave with 128 + signum.
    A second SIGINT/SIGTERM while waiting kills the jobs at once."""
    if _state["stopping"]:
        procs = _processes()
        _kill_trees(
            [
                p
                for p in _descendants(os.getpid(), procs)
                if p in _job_targets(procs) or _SUBMITIT_CONTROLLER in _cmdline(p)
            ],
            procs,
            f"{signal.Signals(signum).name} again",
        )
        raise Interrupted(signum)
    _state["stopping"] = True
    if _job_targets(_processes()):
        log.warning(
            "received %s: stopping the jobs (each saves its checkpoint); "
            "a second Ctrl-C kills them",
            signal.Signals(signum).name,
        )
    stop_jobs()
    raise Interrupted(signum)


def _in_launcher_worker() -> bool:
    """A joblib (loky) worker process running jobs of a sweep launched by :func:`console`."""
    parent = os.environ.get(_LAUNCHER_ENV)
    return parent is not None and parent != str(os.getpid()) and not in_submitit_job()


class UserError(Exception):
    """Base for errors that are the user's to fix (a refused setting or file): the console
    scripts print their message alone, without a traceback, and exit with
    :data:`USER_ERROR_STATUS`. New error types may subclass it; the older ones are named in
    :data:`_USER_ERRORS`."""


USER_ERROR_STATUS = 2  # a refused setting, file or directory: nothing (more) was computed
FAILURE_STATUS = 1  # a diagnosed failure of the run (divergence), or a bug (with traceback)
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"  # =1: tracebacks for every error, as in any Hydra app
# Refused settings and files, wherever they are defined: "module:Class" (imported lazily,
# only when an exception is being reported).
_USER_ERRORS = (
    "metaloss.errors:ConfigError",
    "metaloss.tune:TunedFileError",
    "metaloss.runs:ResumeMismatch",
    "metaloss.runs:RunDirConflict",
    "metaloss.checkpoint:CorruptCheckpoint",
    "metaloss.losses.io:CorruptLossFile",
    "metaloss.losses.io:LossArtifactUnavailable",
    "metaloss.config:UnknownOption",
    "metaloss.config:LossDoesNotFitTask",
    "metaloss.config:LearnedLossOtherTask",
    "metaloss.losses.base:LossContractError",
    "metaloss.report:UnreadableResult",
    "hydra.errors:CompactHydraException",
)
# Failures the run diagnosed itself (the message says what to change): no traceback either.
_DIAGNOSED = (
    "metaloss.meta:NonFiniteMetaGradient",
    "metaloss.train:NonFiniteLoss",
    "metaloss.fewshot.train:MetaTrainingDiverged",
)


def _types(names: tuple[str, ...]) -> tuple[type, ...]:
    out = []
    for name in names:
        module, _, cls = name.partition(":")
        mod = sys.modules.get(module)  # a module never imported raised nothing: not imported here
        t = getattr(mod, cls, None) if mod is not None else None
        if isinstance(t, type):
            out.append(t)
    return tuple(out)


def _resolver_error(exc: BaseException) -> BaseException | None:
    """The refused setting or file behind an interpolation that failed to resolve (a
    ``${metaloss.tuned_params:...}`` reading a bad tuned.json): OmegaConf re-raises the
    resolver's exception wrapped in its own errors. Only the first exception past those
    wrappers — the resolver's own — is classified: a bug raised while handling a user error is
    still a bug (None)."""
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    if not isinstance(exc, InterpolationResolutionError):
        return None
    seen: set[int] = set()
    inner: BaseException | None = exc
    while isinstance(inner, OmegaConfBaseException) and id(inner) not in seen:
        seen.add(id(inner))
        # OmegaConf re-raises its wrappers `from None`: the chain is in __context__ regardless
        inner = inner.__cause__ or inner.__context__
    if inner is not None and isinstance(inner, (UserError, *_types(_USER_ERRORS))):
        return inner
    return None


def error_status(exc: BaseException) -> int | None:
    """The exit status for an error reported without a traceback, None for a bug."""
    if isinstance(exc, (UserError, *_types(_USER_ERRORS))) or _resolver_error(exc):
        return USER_ERROR_STATUS
    if isinstance(exc, _types(_DIAGNOSED)):
        return FAILURE_STATUS
    return None


def error_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    inner = _resolver_error(exc)
    if inner is not None:  # the file or setting at fault, then where it was read
        full_key = getattr(exc, "full_key", None)
        return f"{str(inner).strip()}{f' (reading {full_key})' if full_key else ''}"
    cause = exc.__cause__
    from omegaconf.errors import OmegaConfBaseException

    if (
        isinstance(cause, OmegaConfBaseException) and str(cause).strip()
    ):  # Hydra's composition errors
        text += "\n" + str(cause).strip()
    return text


def _report(exc: BaseException) -> None:
    prog = os.path.basename(sys.argv[0]) or "metaloss"
    sys.stderr.write(
        f"{prog}: error: {error_message(exc)}\n(set {FULL_ERROR_ENV}=1 for the traceback)\n"
    )
    sys.stderr.flush()


def console(hydra_main) -> None:
    """Run a ``@hydra.main`` app as a console script.

    * SIGTERM and Ctrl-C stop parallel jobs too (each saves its checkpoint,
      :func:`stop_jobs`); the exit status is then 128 + signal number.
    * A refused setting or file (:func:`error_status`) prints its message on stderr, no
      traceback, and exits with 2; a diagnosed failure likewise with 1. Anything else is a
      bug: its traceback is printed, exit 1. ``HYDRA_FULL_ERROR=1`` shows the traceback of
      every error (Hydra's own switch: without it Hydra would print its own wrapper).
    """
    import traceback

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and not in_submitit_job():
        os.environ[_LAUNCHER_ENV] = str(os.getpid())  # read by the workers (inherited)
        for s in _HANDLED:
            signal.signal(s, _stop_handler)
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            from metaloss.cli.launchers import deaf_local_controllers

            deaf_local_controllers()
    _state["full"] = os.environ.get(FULL_ERROR_ENV) == "1"
    os.environ[FULL_ERROR_ENV] = (
        "1"  # Hydra re-raises errors instead of printing them: reported here
    )
    try:
        with exit_on_interrupt():
            hydra_main()
    except Exception as e:
        status = error_status(e)  # launchers hand a job's exception back to this process
        if _state["full"] or status is None:
            traceback.print_exc()
            raise SystemExit(status or FAILURE_STATUS) from None
        _report(e)
        raise SystemExit(status) from None
    finally:
        if main_thread and not in_submitit_job() and _state["stopping"]:
            stop_jobs()  # a job started while the launcher was unwinding

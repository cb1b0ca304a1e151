"""Submitit's local executor as a sweep on this machine needs it.

Submitit starts one controller process per job (``python -m submitit.local._local``), which
starts the job. A Ctrl-C in the terminal goes to every process of the foreground group; a
controller that receives it kills its job with SIGKILL one second later, often before the
job has written its checkpoint. :func:`deaf_local_controllers` makes the controllers ignore
SIGINT: the launching process then stops each job itself (SIGINT to the job, and waits:
:func:`metaloss.cli.signals.stop_jobs`), and each controller ends once its job has.

An ignored signal stays ignored across ``exec``, and Python keeps an ignored SIGINT
ignored. The jobs inherit it until their run installs its own handler
(:func:`metaloss.cli.signals.interruptible`); a job stopped before that has nothing to save
yet, and the launcher ends it with SIGKILL.

(Hydra, as installed here, instantiates launchers only from the ``hydra_plugins`` package,
so this is a patch of submitit's ``start_controller`` in the launching process rather than
a launcher subclass.)
"""

from __future__ import annotations

import signal
from typing import Any


def deaf_local_controllers() -> None:
    """Start submitit's local controllers with SIGINT ignored (once per process; a no-op
    without submitit)."""
    try:
        import submitit.local.local as local
    except ImportError:
        return
    original = local.start_controller
    if getattr(original, "_metaloss", False):
        return

    def start_controller(*args: Any, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the controller
        try:
            return original(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    start_controller._metaloss = True  # type: ignore[attr-defined]
    local.start_controller = start_controller

"""The one application skeleton every ``metaloss-*`` Hydra command runs in.

A command is a work function ``work(cfg, run_dir, device, dtype)``; this module does the rest,
the same way for every command, in this order:

1. compose (Hydra) — :func:`hydra_command` builds the ``@hydra.main`` entry point;
2. validate — :func:`metaloss.validate.check_config`, before anything is computed;
3. runtime — device, dtype and threads (:func:`metaloss.runtime.setup`);
4. run identity — the run directory is claimed with the config's identity
   (:class:`metaloss.runs.RunDir`): a directory of another configuration is refused;
5. signals — SIGTERM / Ctrl-C become :class:`~metaloss.cli.signals.Interrupted` while the
   work runs, so it can save what it has (:func:`~metaloss.cli.signals.interruptible`);
6. the work itself, log lines routed around progress bars; it ends by printing where its
   outputs are;
7. exit — a refused setting prints its message and exits 2, a diagnosed failure 1, a signal
   128 + its number (:func:`~metaloss.cli.signals.console`).

Tests call a command's ``run(cfg, out_dir)`` (steps 2–6) with a composed config.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import hydra
import torch
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from metaloss import runtime
from metaloss.cli.signals import console, exit_on_interrupt, interruptible
from metaloss.config import conf_dir
from metaloss.keys import LOCAL
from metaloss.runs import RunDir, identity
from metaloss.validate import check_config

log = logging.getLogger("metaloss")
T = TypeVar("T")
Work = Callable[[DictConfig, Any, torch.device, torch.dtype], T]  # run_dir: RunDir | ReadOnlyDir


def run_command(
    cfg: DictConfig,
    out_dir: Path,
    kind: str,
    work: Work[T],
    *,
    ignore: Iterable[str] = LOCAL,
    allow: Callable[[dict], bool] | None = None,
    claim: Callable[[torch.device], bool] | None = None,
) -> T:
    """Steps 2–6 for one run: ``cfg`` checked, runtime set up, ``out_dir`` claimed as a run
    directory of ``kind`` with the identity of ``cfg`` minus the keys in ``ignore``
    (``allow``: which identity differences the directory accepts, for a resumed run), then
    ``work`` with Ctrl-C / SIGTERM turned into an exception it can clean up after.
    ``claim(device)`` False: this process only reads the directory (a torchrun rank other
    than 0), through a :class:`ReadOnlyDir`."""
    check_config(cfg, kind)
    device, dtype = runtime.setup(cfg)
    owner = claim is None or claim(device)
    held = (
        RunDir(Path(out_dir), kind, identity(cfg, ignore=ignore), allow=allow)
        if owner
        else ReadOnlyDir(Path(out_dir))
    )
    # log lines go through tqdm while a bar is drawn, so they never land inside a bar's line
    with held as run_dir, interruptible(), logging_redirect_tqdm():
        result = work(cfg, run_dir, device, dtype)
    if owner:  # every command ends by saying where its outputs are
        print(where_outputs_are(kind, Path(out_dir)), flush=True)
    return result


def where_outputs_are(kind: str, out_dir: Path) -> str:
    """``metaloss-<kind>: outputs in <run dir>``, with the sweep's directory in a multirun and
    the offline W&B run directory when one was written (``wandb sync`` it to upload)."""
    line = f"metaloss-{kind}: outputs in {out_dir.resolve()}"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        line += f" (sweep {Path(HydraConfig.get().sweep.dir).resolve()})"
    runs = sorted(out_dir.glob("**/offline-run-*"))
    if runs:
        line += f"; W&B run {runs[-1].resolve()}"
    return line


class ReadOnlyDir:
    """The run directory as a process that does not own it sees it (a torchrun rank other
    than 0): it may read the checkpoint, never write or record."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, hydra_files: Any = None) -> None:
        pass

    def __enter__(self) -> ReadOnlyDir:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def hydra_command(
    config_name: str, app: Callable[[DictConfig, HydraConf], float | None]
) -> Callable[[], None]:
    """The console script for ``conf/<config_name>.yaml``: Hydra composes the config (step 1)
    and ``app(cfg, hydra_config)`` runs it, usually through :func:`run_command`; its return
    value is what a Hydra sweeper optimises. Exit codes and error printing: step 7."""

    def _hydra_main(cfg: DictConfig) -> float | None:
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        with exit_on_interrupt():
            return app(cfg, HydraConfig.get())

    # Hydra names the job (and so outputs/<job>/...) after the task function's module: the
    # command's, not this one's
    _hydra_main.__module__ = _module_of(app)
    entry = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    wrapped = entry(_hydra_main)

    def main() -> None:
        """The console script (SIGTERM forwarded to parallel jobs, exit 128 + signal)."""
        console(wrapped)

    return main


def _module_of(fn: Callable[..., Any]) -> str:
    """``fn``'s module by its import name, also when run as ``python -m metaloss.cli.<cmd>``."""
    name = fn.__module__
    spec = getattr(sys.modules.get(name), "__spec__", None) if name == "__main__" else None
    return spec.name if spec is not None else name


def output_dir(hc: HydraConf) -> Path:
    """The run directory Hydra chose for this job."""
    return Path(hc.runtime.output_dir)

"""Run logging for the entry points: Weights & Biases (offline by default) or nothing.

The library returns metric dicts; only entry points hand them to a logger. The W&B run
lives inside the Hydra output directory, so `wandb sync <outdir>/wandb/offline-run-*`
uploads it later.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("metaloss")


class NullLogger:
    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def image(self, key: str, path: Path, step: int | None = None) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, run) -> None:
        self.run = run
        self.run_dir = Path(run.dir).parent if run.dir else None

    def log(self, metrics, step=None):
        self.run.log(dict(metrics), step=step)

    def image(self, key, path, step=None):
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def table(self, key, columns, rows):
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics):
        for k, v in metrics.items():
            self.run.summary[k] = v


@contextmanager
def open_logger(cfg: DictConfig, out_dir: Path, *, job_type: str, name: str | None = None):
    """Yield a logger for this run and always finish it (also on error)."""
    lcfg = cfg.get("logger") or {"kind": "none"}
    if lcfg.get("kind", "none") == "none":
        yield NullLogger()
        return
    import wandb

    run = wandb.init(
        project=lcfg.get("project", "metaloss"),
        entity=lcfg.get("entity"),
        group=lcfg.get("group"),
        tags=list(lcfg.get("tags") or []),
        mode=lcfg.get("mode", "offline"),
        dir=str(out_dir),
        name=name,
        job_type=job_type,
        config=OmegaConf.to_container(cfg, resolve=True),
        settings=wandb.Settings(silent=True, console="off"),
    )
    exit_code = 0
    try:
        yield WandbLogger(run)
    except BaseException:
        exit_code = 1
        raise
    finally:
        run.finish(exit_code=exit_code)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: readers never see a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)

"""W&B's environment variables (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR, as W&B
documents them) are honoured when the config does not set the value; a value set in the
config (command line, experiment file) wins. Checked on offline runs read back from disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaloss.cli.logger import open_logger
from metaloss.wandb_offline import read_run

BIN = Path(sys.executable).parent
ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR")


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _log(cfg, out_dir: Path) -> None:
    with open_logger(cfg, out_dir, job_type="test", name="env") as logger:
        logger.log({"train/loss": 0.5}, step=0)
        logger.summary({"test/mse": 0.25})


def _runs(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*")) + sorted(root.rglob("run-*.wandb"))


def test_environment_is_honoured_when_the_config_leaves_it(compose_cfg, tmp_path, clean_env):
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setenv("WANDB_PROJECT", "from-env")
    clean_env.setenv("WANDB_ENTITY", "env-team")
    clean_env.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    cfg = compose_cfg("train", ["logger=wandb"])
    _log(cfg, tmp_path / "out")
    run = read_run(tmp_path / "wandb-root" / "wandb")
    assert run["finished"] and run["summary"]["test/mse"] == 0.25
    assert run["run"]["project"] == "from-env" and run["run"]["entity"] == "env-team"
    assert not (tmp_path / "out" / "wandb").exists()  # WANDB_DIR, not the run directory
    assert run["config"]["logger"]["project"] == "from-env"  # the config W&B records is what ran


def test_wandb_mode_disabled_writes_nothing(compose_cfg, tmp_path, clean_env):
    clean_env.setenv("WANDB_MODE", "disabled")
    _log(compose_cfg("train", ["logger=wandb"]), tmp_path / "out")
    assert not _runs(tmp_path), _runs(tmp_path)


def test_defaults_without_environment(compose_cfg, tmp_path, clean_env):
    _log(compose_cfg("train", ["logger=wandb"]), tmp_path / "out")
    run = read_run(tmp_path / "out" / "wandb")  # offline, inside the run's directory
    assert run["run"]["project"] == "metaloss"


def test_explicit_config_wins_over_the_environment(compose_cfg, tmp_path, clean_env):
    clean_env.setenv("WANDB_MODE", "disabled")
    clean_env.setenv("WANDB_PROJECT", "from-env")
    clean_env.setenv("WANDB_ENTITY", "env-team")
    clean_env.setenv("WANDB_DIR", str(tmp_path / "env-root"))
    cfg = compose_cfg(
        "train",
        [
            "logger=wandb",
            "logger.mode=offline",
            "logger.project=from-config",
            "logger.entity=config-team",
            f"logger.dir={tmp_path / 'config-root'}",
        ],
    )
    _log(cfg, tmp_path / "out")
    run = read_run(tmp_path / "config-root" / "wandb")
    assert run["run"]["project"] == "from-config" and run["run"]["entity"] == "config-team"
    assert not (tmp_path / "env-root").exists()


def test_explicit_disabled_wins_over_an_offline_environment(compose_cfg, tmp_path, clean_env):
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setenv("WANDB_DIR", str(tmp_path / "env-root"))
    _log(compose_cfg("train", ["logger=wandb", "logger.mode=disabled"]), tmp_path / "out")
    assert not _runs(tmp_path), _runs(tmp_path)


def test_a_logger_config_without_the_keys_follows_the_environment(tmp_path, clean_env):
    """A logger config composed in code (or a user's own logger YAML) that lacks the keys."""
    from omegaconf import OmegaConf

    clean_env.setenv("WANDB_PROJECT", "from-env")
    clean_env.setenv("WANDB_DIR", str(tmp_path / "root"))
    _log(OmegaConf.create({"seed": 0, "logger": {"kind": "wandb"}}), tmp_path / "out")
    run = read_run(tmp_path / "root" / "wandb")  # mode: offline by default, as in the YAML
    assert run["run"]["project"] == "from-env"


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_console_script_honours_the_environment(tmp_path):
    """A real `metaloss-train` run: WANDB_PROJECT / WANDB_DIR from its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(
        WANDB_SILENT="true",
        WANDB_PROJECT="from-env",
        WANDB_DIR=str(tmp_path / "root"),
        WANDB_MODE="offline",
    )
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            str(BIN / "metaloss-train"),
            "task=outliers",
            "loss=mse",
            "train.steps=5",
            "logger=wandb",
            "progress=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = read_run(tmp_path / "root" / "wandb")
    assert run["run"]["project"] == "from-env" and run["finished"]
    assert not (run_dir / "wandb").exists()


def test_wandb_mode_dryrun_is_offline_as_wandb_takes_it(compose_cfg, tmp_path, clean_env):
    """W&B documents WANDB_MODE=dryrun (an alias of offline): it passes the settings check and
    writes an offline run (before: every app refused it, exit 2)."""
    from metaloss.validate import check_config

    clean_env.setenv("WANDB_MODE", "dryrun")
    cfg = compose_cfg("train", ["logger=wandb"])
    check_config(cfg)
    _log(cfg, tmp_path / "out")
    assert read_run(tmp_path / "out" / "wandb")["finished"]

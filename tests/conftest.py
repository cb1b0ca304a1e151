"""Shared fixtures: compose real Hydra configs from the package's conf/ directory."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from metaloss.config import conf_dir

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def compose_cfg():
    """compose_cfg(config_name, overrides) -> DictConfig, via Hydra's real composition."""

    def _compose(config_name: str, overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides or []))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _default_dtype():
    """Some oracle tests switch to float64; never let that leak into other tests."""
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


def _wait_for_step(ckpt, step: int, proc, timeout: float = 240) -> int:
    """Poll a running process's checkpoint until it holds ``step`` completed outer steps."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read().decode()[-3000:]}")
        if ckpt.is_file():
            try:
                s = int(torch.load(ckpt, weights_only=True)["step"])
            except Exception:  # being replaced right now
                s = -1
            if s >= step:
                return s
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


@pytest.fixture
def wait_for_step():
    """wait_for_step(checkpoint_path, step, popen) -> the step reached."""
    return _wait_for_step

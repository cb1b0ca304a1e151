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


@pytest.fixture
def interrupted_then_resumed(compose_cfg, tmp_path, monkeypatch):
    """run(overrides, learner_cls, loss_name) -> (straight_dir, resumed_dir, checkpoint).

    Runs ``metaloss-meta`` once straight through; then again with Ctrl-C raised right after
    the third call of ``learner_cls.step`` has changed φ, the optimizer and the RNG (the worst
    moment: the step is not complete), and resumes that run in its own directory.
    ``checkpoint`` is what the interrupted run left behind."""
    from metaloss.cli import meta as meta_app

    def run(overrides, learner_cls, loss_name):
        straight, broken = tmp_path / "straight", tmp_path / "broken"
        meta_app.run(compose_cfg("meta", overrides), straight, loss_name)
        real, calls = learner_cls.step, {"n": 0}

        def interrupted(self, *a, **k):
            out = real(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(learner_cls, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            meta_app.run(compose_cfg("meta", overrides), broken, loss_name)
        ckpt = torch.load(broken / "checkpoint.pt", weights_only=True)
        monkeypatch.setattr(learner_cls, "step", real)
        meta_app.run(compose_cfg("meta", overrides), broken, loss_name)  # same directory: resumes
        return straight, broken, ckpt

    return run

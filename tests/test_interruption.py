"""Ctrl-C, SIGTERM and SIGKILL at any moment: the resumed run ends with exactly the φ of an
uninterrupted one (bit-identical on CPU), for every hypergradient method."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaloss.cli import meta as meta_app
from metaloss.meta import MetaLearner
from metaloss.wandb_offline import read_run

BIN = Path(sys.executable).parent
TINY = [
    "logger=none",
    "progress=false",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta.plot_every=100",
    "meta.checkpoint_every=100",
    "meta_test.enabled=false",
]
METHODS = {
    "unrolled": [],
    "truncated": ["hypergrad=truncated", "hypergrad.k=1", "meta.learn_inner_lr=true"],
    "first_order": ["hypergrad=first_order"],
    "higher": ["hypergrad=higher"],
    "es": ["hypergrad=es", "hypergrad.population=2", "meta_optim.lr=0.05"],
    "online": ["meta.mode=online", "meta.online_update_every=2", "meta.inner_batch=16"],
}


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "learned_loss.pt", weights_only=True)["state_dict"]


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupt_after_an_update_but_before_its_step_completes(interrupted_then_resumed, method):
    """The worst moment: outer step 3 has already changed φ, the optimizer and the RNG, but
    has not completed. The checkpoint must hold step 2's state, not a mix."""
    straight, broken, ckpt = interrupted_then_resumed(
        TINY + METHODS[method] + ["meta.steps=5"], MetaLearner, "ml3"
    )
    # the third update ends outer step 3 offline; online it is base step 5 (updates every 2 steps)
    assert ckpt["step"] == (4 if method == "online" else 2)
    _assert_identical(_state(straight), _state(broken))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
@pytest.mark.parametrize("method", ["unrolled", "es"])
def test_a_killed_process_resumes_bit_identically(tmp_path, wait_for_step, sig, method):
    """A real `metaloss-meta` process gets the signal mid-run; rerun into its directory with
    a budget a few steps beyond where it stopped, and compare with a run that never stopped."""
    run_dir = tmp_path / "run"
    extra = METHODS[method] + ["meta.checkpoint_every=1", "logger=wandb"]
    cmd = [BIN / "metaloss-meta", *TINY, *extra]
    proc = subprocess.Popen(
        [*cmd, "meta.steps=100000", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_step(run_dir / "checkpoint.pt", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    expected = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}[sig]
    assert proc.returncode == expected, err.decode()[-3000:]
    done = int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"])
    assert 3 <= done < 100000
    if sig != signal.SIGKILL:  # the W&B run was finished, not left open
        assert read_run(run_dir / "wandb")["finished"]
        assert b"checkpoint saved" in out + err  # Hydra logs to stdout
    total = done + 3
    resumed = subprocess.run(
        [*cmd, f"meta.steps={total}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from {run_dir / 'checkpoint.pt'} at outer step {done}"
        in resumed.stdout + resumed.stderr
    )
    straight_dir = tmp_path / "straight"
    straight = subprocess.run(
        [*cmd, f"meta.steps={total}", f"hydra.run.dir={straight_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    _assert_identical(_state(straight_dir), _state(run_dir))


def test_online_step_budget_is_part_of_the_identity(compose_cfg, tmp_path):
    """Online, the loss sees progress t = step/steps: a new budget is a different run."""
    from metaloss.runs import RunDirConflict

    online = TINY + METHODS["online"]
    meta_app.run(compose_cfg("meta", online + ["meta.steps=4"]), tmp_path, "ml3")
    with pytest.raises(RunDirConflict, match="meta.steps"):
        meta_app.run(compose_cfg("meta", online + ["meta.steps=6"]), tmp_path, "ml3")


def test_sigterm_handler_is_removed_after_the_run(compose_cfg, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=1"]), tmp_path, "ml3")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_swallowed_by_a_weakref_callback_is_raised_again():
    """Python ignores an exception raised inside a weakref callback, and a signal handler
    may run there: the stop must still end the run, not vanish (a run once ignored SIGTERM
    this way). The callback sends SIGTERM to itself, so the handler fires inside it."""
    import gc
    import os
    import time
    import weakref

    from metaloss.cli.signals import Interrupted, interruptible

    class Owner:
        pass

    hook_before = sys.unraisablehook
    inside = []

    def callback(_ref):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes: the handler runs here, in the callback
            inside.append(1)

    with pytest.raises(Interrupted, match="SIGTERM"):
        with interruptible():
            owner = Owner()
            ref = weakref.ref(owner, callback)
            del owner  # the callback runs now and swallows the first Interrupted
            gc.collect()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
    assert len(inside) < 1000  # the handler did fire inside the callback
    assert ref() is None
    assert sys.unraisablehook is hook_before  # restored

"""Stopping a sweep stops it: SIGTERM or Ctrl-C (SIGINT) to the launching process of a
multirun ends every job (each writes the checkpoint of its last completed step, so a rerun
continues), the launcher exits 143 / 130, and no process of the sweep is left behind
(joblib's loky workers, submitit's local controllers and jobs).

Every process is started in its own session, so "left behind" means: any process whose
session id is the launcher's pid (read from /proc).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
EXPECTED = {signal.SIGTERM: 143, signal.SIGINT: 130}


def _session(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of session ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(
                    (
                        int(entry),
                        Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(),
                    )
                )
        except (OSError, ValueError, IndexError):
            continue
    return out


def _assert_session_ends(sid: int, grace: float = 10.0) -> None:
    deadline = time.time() + grace
    while _session(sid) and time.time() < deadline:
        time.sleep(0.1)
    left = _session(sid)
    for pid, _ in left:  # do not leak them into the rest of the test run
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"


# -- fast: a console script whose job is a plain child process ----------------------------

_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    from metaloss.cli.signals import console

    child = sys.argv[1]
    def main():
        # the launcher stops the jobs it knows: this child carries a loky worker's marker
        subprocess.Popen([sys.executable, "-c", child, "loky.backend.popen_loky_posix"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])"""
    """  # no job: left alone
        while True:
            time.sleep(0.05)
    console(main)
"""
)

_JOB = textwrap.dedent("""
    import pathlib, signal, sys, time
    out = pathlib.Path({out!r})
    def stop(signum, frame):
        out.with_suffix(".stopping").write_text("")
        time.sleep({cleanup_s})  # the clean-up takes a while: the launcher must wait for it
        out.write_text(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    out.with_suffix(".ready").write_text("")
    while True:
        time.sleep(0.05)
""")


def _launch_fake(
    tmp_path: Path, env: dict | None = None, cleanup_s: float = 0.5
) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "job.txt"
    child = _JOB.format(out=str(out), cleanup_s=cleanup_s)
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, child],
        cwd=tmp_path,
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.time() + 60
    while not out.with_suffix(".ready").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    return proc, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_launcher_waits_for_its_jobs_clean_up_and_leaves_nothing(tmp_path, sig):
    proc, out = _launch_fake(tmp_path)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXPECTED[sig], log
    assert "Traceback" not in log, log
    assert out.read_text() == "SIGTERM"  # the job got SIGTERM and finished its clean-up first
    _assert_session_ends(proc.pid, grace=2)


def test_a_job_that_does_not_stop_is_killed_after_the_timeout(tmp_path):
    proc, out = _launch_fake(tmp_path, env={"METALOSS_STOP_TIMEOUT_S": "0.2"})
    t0 = time.time()
    proc.send_signal(signal.SIGINT)  # the job's clean-up (0.5 s) outlasts the 0.2 s timeout
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log
    assert time.time() - t0 < 20
    assert not out.exists()  # killed before its clean-up ended
    assert "did not stop within 0.2 s" in log, log
    _assert_session_ends(proc.pid, grace=2)


def test_a_second_signal_kills_the_jobs_at_once(tmp_path):
    proc, out = _launch_fake(tmp_path, env={"METALOSS_STOP_TIMEOUT_S": "60"}, cleanup_s=30)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while not out.with_suffix(".stopping").exists():  # the launcher has passed the first one on
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)  # within the job's 30 s clean-up
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log
    assert "SIGINT again" in log, log
    assert not out.exists() and time.time() - t0 < 20  # killed, not waited for
    _assert_session_ends(proc.pid, grace=2)


# -- slow: real multiruns of metaloss-meta through both local launchers ---------------------

LAUNCH = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "local": ["hydra/launcher=local"],
}
META = [
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta_test.enabled=false",
    "logger=none",
    "progress=false",
    "seed=0,1",
    "meta.checkpoint_every=1000",
    "meta.plot_every=100000",
]


def _checkpoints(sweep_root: Path) -> dict[str, int]:
    out = {}
    for ckpt in sweep_root.glob("multirun/meta/*/*/checkpoint.pt"):
        try:
            out[ckpt.parent.name.split("_")[0]] = int(torch.load(ckpt, weights_only=True)["step"])
        except Exception:  # being written
            pass
    return out


def _running(sweep_root: Path) -> set[str]:
    """Jobs whose meta-training loop has started (the line it logs before step 0)."""
    return {
        p.parent.name.split("_")[0]
        for p in sweep_root.glob("multirun/meta/*/*/meta.log")
        if "meta-training ml3" in p.read_text()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, group",
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT", "terminal-Ctrl-C"],
)
@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_stopping_a_sweep_stops_every_job_which_resumes(tmp_path, launcher, sig, group):
    """The checkpoints are *not* periodic here (every 1000 steps): each job's checkpoint on
    disk is the one it wrote when it was stopped. ``group``: the signal goes to every process
    of the launcher's process group at once, as a terminal's Ctrl-C does (submitit's local
    controllers would otherwise kill their jobs a second later)."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    cmd = [str(BIN / "metaloss-meta"), "-m", *LAUNCH[launcher], *META]
    proc = subprocess.Popen(
        [*cmd, "meta.steps=100000"],
        cwd=tmp_path,
        env=env,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while (
        len(_running(tmp_path)) < 2
    ):  # both jobs are in meta-training (its handlers are installed)
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    assert not _checkpoints(tmp_path)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXPECTED[sig], log[-3000:]
    _assert_session_ends(proc.pid)
    done = _checkpoints(tmp_path)
    assert set(done) == {"0", "1"}, (done, log[-3000:])  # written at the stop, by each job
    for job_log in [
        log,
        *(p.read_text() for p in tmp_path.glob("multirun/meta/*/.submitit/*/*_log.out")),
    ]:
        assert "Traceback" not in job_log, job_log[-3000:]

    assert (
        log.count("checkpoint saved")
        + sum(
            p.read_text().count("checkpoint saved")
            for p in tmp_path.glob("multirun/meta/*/.submitit/*/*_log.out")
        )
        == 2
    )
    if (launcher, sig, group) != ("joblib", signal.SIGINT, False):
        return  # the rerun is the same for every way of stopping; once is enough
    sweep = next((tmp_path / "multirun" / "meta").iterdir())
    total = max(done.values()) + 2
    rerun = subprocess.run(
        [*cmd, f"meta.steps={total}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = re.findall(
        r"resumed from (\S+)/checkpoint\.pt at outer step (\d+)", rerun.stdout + rerun.stderr
    )
    assert sorted((Path(d).name.split("_")[0], int(s)) for d, s in resumed) == sorted(
        done.items()
    ), resumed
    for job in ("0", "1"):
        (run_dir,) = sweep.glob(f"{job}_*")
        assert json.loads((run_dir / "run.json").read_text())["identity"]["seed"] == int(job)
        assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == total


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_jobs_of_a_killed_launcher_stop_themselves_with_a_checkpoint(tmp_path, launcher):
    """SIGKILL cannot be caught by the launcher; its jobs notice within a second that it is
    gone and stop as on Ctrl-C (checkpoint, then exit) instead of running on unwatched."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.Popen(
        [str(BIN / "metaloss-meta"), "-m", *LAUNCH[launcher], *META, "meta.steps=100000"],
        cwd=tmp_path,
        env=env,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while len(_running(tmp_path)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    _assert_session_ends(proc.pid, grace=30)
    assert set(_checkpoints(tmp_path)) == {"0", "1"}

"""Run identity: every run owns its directory, never resumes someone else's state."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.losses.io import load_learned_loss
from metaloss.runs import ResumeMismatch, RunDir, RunDirConflict, identity

BIN = Path(sys.executable).parent
TINY = [
    "logger=none",
    "progress=false",
    "meta.steps=3",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta.plot_every=100",
    "meta.checkpoint_every=1",
    "meta_test.enabled=false",
]


def _phi(path):
    return load_learned_loss(path).state_dict()


@pytest.mark.slow
def test_multirun_jobs_differing_only_in_experiment_get_their_own_dirs(tmp_path):
    """Used to share one directory: job 2 'resumed' job 1 and saved job 1's φ as its own."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            BIN / "metaloss-meta",
            "-m",
            "experiment=quickstart,ml3_sine",
            "meta.steps=2",
            "meta_test.enabled=false",
            "logger=none",
            "progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("run.json"))
    assert len(runs) == 2, runs
    owners = [json.loads((r / "run.json").read_text()) for r in runs]
    assert owners[0]["fingerprint"] != owners[1]["fingerprint"]
    assert {o["identity"]["meta.val_from_train"] for o in owners} == {True, False}
    for r in runs:  # each trained its own 2 steps from scratch
        assert torch.load(r / "checkpoint.pt", weights_only=True)["step"] == 2
    a, b = (_phi(r / "learned_loss.pt") for r in runs)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_distinct_dirs(tmp_path):
    cmd = [
        BIN / "metaloss-train",
        "task=outliers",
        "loss=mse",
        "train.steps=5",
        "logger=none",
        "progress=false",
    ]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-2000:]
    dirs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(dirs) == 2 and all((d / "metrics.json").is_file() for d in dirs)


def test_rerun_into_a_used_directory_with_another_config_is_refused(compose_cfg, tmp_path):
    meta_app.run(compose_cfg("meta", TINY), tmp_path, "ml3")
    before = (tmp_path / "learned_loss.pt").read_bytes()
    with pytest.raises(RunDirConflict, match=r"seed: 0 -> 1"):
        meta_app.run(compose_cfg("meta", TINY + ["seed=1"]), tmp_path, "ml3")
    with pytest.raises(RunDirConflict, match=r"task.amplitude"):
        meta_app.run(compose_cfg("meta", TINY + ["task.amplitude=[1.0,2.0]"]), tmp_path, "ml3")
    assert (tmp_path / "learned_loss.pt").read_bytes() == before  # nothing of the owner touched
    # the same config again is the same run: it resumes (here: already complete) and agrees
    meta_app.run(compose_cfg("meta", TINY), tmp_path, "ml3")
    a, b = (
        torch.load(tmp_path / "learned_loss.pt", weights_only=True),
        torch.load(__import__("io").BytesIO(before), weights_only=True),
    )
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_a_train_run_and_a_meta_run_never_share_a_directory(compose_cfg, tmp_path):
    meta_app.run(compose_cfg("meta", TINY), tmp_path, "ml3")
    cfg = compose_cfg(
        "train", ["task=sine", "loss=mse", "logger=none", "progress=false", "train.steps=3"]
    )
    with pytest.raises(RunDirConflict, match="holds a meta run"):
        train_app.run(cfg, tmp_path, "mse")


def test_a_refused_setup_does_not_claim_the_directory(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="needs a parametric loss"):
        meta_app.run(compose_cfg("meta", TINY[:3] + ["loss=mse"]), tmp_path, "mse")
    meta_app.run(compose_cfg("meta", TINY), tmp_path, "ml3")  # the corrected command runs
    assert (tmp_path / "learned_loss.pt").is_file()


def test_a_directory_in_use_is_refused(compose_cfg, tmp_path):
    cfg = compose_cfg("meta", TINY)
    with RunDir(
        tmp_path, "meta", identity(cfg)
    ):  # another process holds it (flock is per open file)
        with pytest.raises(RunDirConflict, match="in use by pid"):
            meta_app.run(cfg, tmp_path, "ml3")
    meta_app.run(cfg, tmp_path, "ml3")  # released: runs


@pytest.mark.slow
def test_two_processes_on_one_directory(tmp_path, wait_for_step):
    """A second launch into a running run's directory exits non-zero at once; the first finishes."""
    run_dir = tmp_path / "run"
    cmd = [BIN / "metaloss-meta", f"hydra.run.dir={run_dir}", *TINY, "meta.steps=100000"]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_step(run_dir / "checkpoint.pt", 1, first)
        second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "in use by pid" in second.stderr
        assert first.poll() is None  # untouched, still running
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert first.returncode == 143  # SIGTERM, saved and exited cleanly


def test_checkpoint_of_another_config_is_refused_naming_the_keys(compose_cfg, tmp_path):
    part = tmp_path / "part"
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), part, "ml3")
    with pytest.raises(ResumeMismatch, match=r"optim.lr: 0.05 -> 0.02"):
        meta_app.run(
            compose_cfg("meta", TINY + ["optim.lr=0.02", f"meta.resume_from={part}"]),
            tmp_path / "other",
            "ml3",
        )
    with pytest.raises(ResumeMismatch, match=r"past meta.steps=1"):
        meta_app.run(
            compose_cfg("meta", TINY + ["meta.steps=1", f"meta.resume_from={part}"]),
            tmp_path / "short",
            "ml3",
        )


def test_a_changed_meta_learning_rate_is_applied_on_explicit_resume(compose_cfg, tmp_path, caplog):
    part = tmp_path / "part"
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), part, "ml3")
    # implicit (same directory, no resume_from): refused, with the way to do it
    with pytest.raises(RunDirConflict, match=r"meta_optim.lr: 0.001 -> 0.0005"):
        meta_app.run(compose_cfg("meta", TINY + ["meta_optim.lr=0.0005"]), part, "ml3")
    seen = {}
    real = meta_app.MetaLearner.step

    def spy(self, *a, **k):
        seen["lr"] = self.optimizer.param_groups[0]["lr"]
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meta_app.MetaLearner, "step", spy)
        caplog.set_level("WARNING", logger="metaloss")
        meta_app.run(
            compose_cfg("meta", TINY + ["meta_optim.lr=0.0005", f"meta.resume_from={part}"]),
            tmp_path / "cont",
            "ml3",
        )
    assert seen["lr"] == 0.0005
    assert (
        "meta_optim.lr: 0.001 -> 0.0005" in caplog.text
        and "applied from outer step 2" in caplog.text
    )


@pytest.mark.slow
def test_a_refused_launch_leaves_the_owners_hydra_record_intact(tmp_path):
    run_dir = tmp_path / "run"
    base = [BIN / "metaloss-meta", f"hydra.run.dir={run_dir}", *TINY, "meta.steps=1"]
    assert subprocess.run(base, cwd=tmp_path, capture_output=True, timeout=180).returncode == 0
    record = (run_dir / ".hydra" / "config.yaml").read_text()
    refused = subprocess.run(
        [*base, "seed=7"], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert refused.returncode != 0 and "seed: 0 -> 7" in refused.stdout + refused.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record


@pytest.mark.slow
def test_a_launch_refused_while_the_owner_runs_leaves_the_owners_record(tmp_path, wait_for_step):
    run_dir = tmp_path / "run"
    owner = subprocess.Popen(
        [BIN / "metaloss-meta", f"hydra.run.dir={run_dir}", *TINY, "meta.steps=100000"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_step(run_dir / "checkpoint.pt", 1, owner)
        refused = subprocess.run(
            [BIN / "metaloss-meta", f"hydra.run.dir={run_dir}", *TINY, "seed=7"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert refused.returncode != 0 and "in use by pid" in refused.stdout + refused.stderr
    finally:
        owner.terminate()
        owner.wait(timeout=120)
    assert "seed=7" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "seed: 7" not in (run_dir / ".hydra" / "config.yaml").read_text()


def test_rerunning_a_command_started_from_resume_from_continues_its_own_checkpoint(
    compose_cfg, tmp_path, monkeypatch
):
    first = tmp_path / "first"
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), first, "ml3")
    cont = TINY + ["meta.steps=5", "meta_optim.lr=0.01", f"meta.resume_from={first}"]
    meta_app.run(compose_cfg("meta", cont), tmp_path / "reference", "ml3")
    real = meta_app.MetaLearner.step
    calls = {"n": 0}

    def stop_at_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(meta_app.MetaLearner, "step", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        meta_app.run(compose_cfg("meta", cont), tmp_path / "second", "ml3")
    monkeypatch.setattr(meta_app.MetaLearner, "step", real)
    meta_app.run(
        compose_cfg("meta", TINY + ["meta.steps=4"]), first, "ml3"
    )  # the source moves on meanwhile
    meta_app.run(compose_cfg("meta", cont), tmp_path / "second", "ml3")  # the same command again
    a, b = (
        _phi(tmp_path / "reference" / "learned_loss.pt"),
        _phi(tmp_path / "second" / "learned_loss.pt"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rerunning_a_sweep_with_a_bigger_budget_resumes_its_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    base = [BIN / "metaloss-meta", "-m", *TINY, "seed=0", f"hydra.sweep.dir={sweep}"]
    assert (
        subprocess.run(
            [*base, "meta.steps=2"], cwd=tmp_path, capture_output=True, timeout=180
        ).returncode
        == 0
    )
    again = subprocess.run(
        [*base, "meta.steps=3"], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 0, again.stderr[-2000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(jobs) == 1 and "at outer step 2" in again.stdout + again.stderr
    assert torch.load(jobs[0] / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_reaches_its_jobs(tmp_path):
    import fcntl
    import signal
    import time

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [
            BIN / "metaloss-meta",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *TINY,
            "meta.steps=100000",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    t0 = time.time()
    while len(list(sweep.rglob("checkpoint.pt"))) < 2:
        assert proc.poll() is None and time.time() - t0 < 240, "jobs did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 143
    locks = list(sweep.rglob(".metaloss.lock"))
    assert len(locks) == 2
    for lock in locks:  # every job has let go of its directory: none orphaned
        deadline = time.time() + 60
        with open(lock) as f:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.time() < deadline, f"{lock.parent} still held by an orphaned job"
                    time.sleep(0.2)


def test_files_are_readable_by_others_and_stale_temp_files_are_removed(compose_cfg, tmp_path):
    import os
    import stat

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=1"]), tmp_path, "ml3")
    assert not (tmp_path / ".checkpoint.pt.x1y2.tmp").exists()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("learned_loss.pt", "checkpoint.pt", "run.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_a_run_recorded_before_a_new_setting_existed_still_resumes(compose_cfg, tmp_path):
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=1"]), tmp_path, "ml3")
    owner = json.loads((tmp_path / "run.json").read_text())
    for k in ("device", "dtype"):  # as a run made before these keys existed recorded it
        owner["identity"].pop(k)
    (tmp_path / "run.json").write_text(json.dumps(owner))
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), tmp_path, "ml3")
    with pytest.raises(
        RunDirConflict, match="meta.resume_from="
    ):  # the hint for an applied-only change
        meta_app.run(
            compose_cfg("meta", TINY + ["meta.steps=2", "meta_optim.lr=0.01"]), tmp_path, "ml3"
        )

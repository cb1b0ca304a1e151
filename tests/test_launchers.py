"""Sweeps through Hydra's launcher plugins (conf/hydra/launcher/, docs/cluster.md).

* every app selects ``hydra/launcher=slurm|local|joblib``; the SLURM one writes the sbatch
  array it should (checked without a cluster: submission is intercepted);
* real multiruns of the console scripts through joblib and submitit's local executor (the
  SLURM code path on one machine): one sweep directory, one directory per job with that
  job's own result, the same results from both launchers, ``metaloss-report`` collects them;
* preemption through the Hydra submitit plugin itself: SIGUSR2 (what submitit's
  ``LocalJob._interrupt()`` sends, and what SLURM sends before a timeout or, with
  ``preempt_send_user_signal``, at preemption) makes submitit call the launcher's
  ``checkpoint`` and requeue the job with the same arguments; the requeued job runs in the
  same directory, resumes from ``checkpoint.pt`` and ends with φ bit-identical to an
  uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaloss.cli import meta as meta_app
from metaloss.cli.report import main as report_main
from metaloss.config import conf_dir

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[cluster]'")
import submitit  # noqa: E402  (installed with the submitit launcher)

BIN = Path(sys.executable).parent
LAUNCH = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "local": ["hydra/launcher=local"],
}
TRAIN = ["task=outliers", "loss=mse,mae", "train.steps=20", "logger=none", "progress=false"]
META_STEPS = 40
META = [
    f"meta.steps={META_STEPS}",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta_test.enabled=false",
    "logger=none",
    "progress=false",
    "seed=0,1",
    "meta.checkpoint_every=1",
    "meta.plot_every=1000",
]
TARGETS = {"slurm": "SlurmLauncher", "local": "LocalLauncher", "joblib": "JoblibLauncher"}


def _compose(app: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=app, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _start(app: str, args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    return subprocess.Popen(
        [str(BIN / f"metaloss-{app}"), "-m", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _sweep_dir(cwd: Path, app: str) -> Path:
    """The sweep's directory: exactly one, although its name (launch time and the launching
    process's id: cached resolvers) is resolved again in every job's process and again after
    a requeue: the cached values travel in the pickled config."""
    sweeps = list((cwd / "multirun" / app).iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def _jobs(sweep: Path) -> list[Path]:
    return sorted(
        (p.parent for p in sweep.glob("*/run.json")), key=lambda d: int(d.name.split("_")[0])
    )


def _first_checkpoint(proc: subprocess.Popen, cwd: Path) -> tuple[Path, int]:
    """Wait until job 0 of the meta sweep has a checkpoint: (its directory, its process id)."""
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        ready = [d for d in cwd.glob("multirun/meta/*/0_*") if (d / "checkpoint.pt").is_file()]
        if ready:
            pid = json.loads((ready[0] / "run.json").read_text())["pid"]
            assert pid != proc.pid  # the job runs in its own process
            return ready[0], pid
        time.sleep(0.02)
    raise AssertionError(
        "job 0 never wrote a checkpoint:\n"
        f"{proc.communicate()[0][-3000:] if proc.poll() is not None else ''}"
    )


def _phi(run_dir: Path) -> dict:
    return torch.load(run_dir / "learned_loss.pt", weights_only=True)["state_dict"]


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("app", ["train", "meta", "eval"])
def test_every_app_selects_every_launcher_with_one_core_per_thread(app):
    for name, cls in TARGETS.items():
        cfg = _compose(app, [f"hydra/launcher={name}", "threads=3"])
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert launcher["_target_"].endswith(cls), launcher
        if name != "joblib":
            assert launcher["cpus_per_task"] == 3  # follows `threads`


def test_slurm_launcher_submits_the_expected_array_and_requeues_with_the_same_arguments(
    tmp_path, monkeypatch
):
    """No cluster here: the executor is built by the plugin exactly as on SLURM, then the
    submission is intercepted and its sbatch script inspected."""
    monkeypatch.setattr(
        submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2)
    )  # "srun exists"
    seen = {}

    class Submitted(Exception):
        pass

    def intercept(auto, fn, *iterables):
        seen.update(executor=auto._executor, fn=fn, args=list(zip(*iterables)))
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", intercept)
    cfg = _compose(
        "meta",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "threads=4",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    ex = seen["executor"]
    assert isinstance(ex, submitit.SlurmExecutor)
    sbatch = ex._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in (
        "--cpus-per-task=4",
        "--partition=gpu",
        "--signal=USR2@120",
        "--time=60",
        "--mem=4GB",
        "--ntasks-per-node=1",
        "--nodes=1",
    ):
        assert f"#SBATCH {line}\n" in sbatch, sbatch
    assert "--gpus-per-node" not in sbatch  # null asks for none
    assert ex.max_num_timeout == 3
    assert str(ex.folder).startswith(str(tmp_path / "sweep" / ".submitit"))
    # each job's arguments: its overrides and its number (hence its directory); on SIGUSR2
    # submitit requeues whatever `checkpoint` returns: the same call with the same arguments
    assert [a[:3] for a in seen["args"]] == [
        (["seed=0"], "hydra.sweep.dir", 0),
        (["seed=1"], "hydra.sweep.dir", 1),
    ]
    again = launcher.checkpoint(*seen["args"][1])
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function is seen["fn"] is launcher and again.args == seen["args"][1]


@pytest.mark.slow
def test_train_sweep_through_joblib_and_submitit_local(tmp_path):
    procs = {name: _start("train", args + TRAIN, tmp_path / name) for name, args in LAUNCH.items()}
    results = {}
    for name, proc in procs.items():
        _finish(proc)
        sweep = _sweep_dir(tmp_path / name, "train")
        jobs = _jobs(sweep)
        assert [j.name.split(",")[0] for j in jobs] == [
            "0_loss=mse",
            "1_loss=mae",
        ]  # slug resolved in the worker
        for job, loss in zip(jobs, ["mse", "mae"]):
            rec = json.loads((job / "metrics.json").read_text())
            owner = json.loads((job / "run.json").read_text())
            assert rec["loss"] == loss and rec["seed"] == 0, rec
            assert owner["app"] == "train" and owner["pid"] != proc.pid  # ran in a worker process
            assert f"loss={loss}" in (job / ".hydra" / "overrides.yaml").read_text()
            results[name, loss] = rec["metrics"]
        assert report_main([str(sweep)]) == 0
        report = json.loads((sweep / "report.json").read_text())
        assert set(report) == {"loss=mse", "loss=mae"}
        for loss in ("mse", "mae"):
            assert report[f"loss={loss}"]["test/mse"]["n"] == 1
            assert report[f"loss={loss}"]["test/mse"]["mean"] == pytest.approx(
                results[name, loss]["test/mse"]
            )
    assert results["joblib", "mse"] != results["joblib", "mae"]
    for loss in ("mse", "mae"):  # the launcher does not change the result
        assert results["joblib", loss] == results["local", loss]


@pytest.mark.slow
def test_meta_sweep_preempted_through_submitit_requeues_and_resumes_bit_identically(
    tmp_path, compose_cfg
):
    """Two seeds through submitit's local executor; job 0 is preempted after its first
    checkpoint. The reference is the same seed-0 run, uninterrupted and without a launcher."""
    proc = _start("meta", LAUNCH["local"] + META, tmp_path / "local")
    victim, pid = _first_checkpoint(proc, tmp_path / "local")
    os.kill(pid, signal.SIGUSR2)  # = submitit's LocalJob._interrupt(); SLURM: --signal=USR2@...
    overrides = [o for o in META if not o.startswith("seed=")] + ["seed=0"]
    meta_app.run(compose_cfg("meta", overrides), tmp_path / "reference", "ml3")  # meanwhile
    _finish(proc)

    sweep = _sweep_dir(tmp_path / "local", "meta")
    jobs = _jobs(sweep)
    assert [j.name[:2] for j in jobs] == ["0_", "1_"] and jobs[
        0
    ] == victim  # requeued into its own dir
    logs = [p.read_text() for p in sweep.glob(".submitit/*/*_log.out")]
    (log,) = [text for text in logs if "this job is preempted" in text]  # job 0's, and only it
    assert "Calling checkpoint method" in log and "Requeued job" in log
    resumed = re.search(r"resumed from .*checkpoint\.pt at outer step (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < META_STEPS, log[-3000:]
    for seed, job in enumerate(jobs):
        assert json.loads((job / "run.json").read_text())["identity"]["seed"] == seed
        assert torch.load(job / "checkpoint.pt", weights_only=True)["step"] == META_STEPS
    assert _identical(_phi(jobs[0]), _phi(tmp_path / "reference")), "preemption + requeue changed φ"
    assert not _identical(_phi(jobs[0]), _phi(jobs[1]))  # each job its own seed


@pytest.mark.slow
def test_slurm_style_preemption_sigterm_then_sigusr2_requeues(tmp_path, compose_cfg):
    """Clusters that preempt with SIGTERM then SIGUSR2: SIGTERM only requests a checkpoint
    inside a submitit job, SIGUSR2 requeues, the job resumes and ends bit-identical."""
    seed0 = [o for o in META if not o.startswith("seed=")] + ["seed=0"]
    proc = _start("meta", LAUNCH["local"] + seed0, tmp_path / "local")
    victim, pid = _first_checkpoint(proc, tmp_path / "local")
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(pid, signal.SIGUSR2)  # still alive: inside a submitit job SIGTERM only checkpoints
    meta_app.run(compose_cfg("meta", seed0), tmp_path / "reference", "ml3")
    _finish(proc)
    assert _identical(_phi(victim), _phi(tmp_path / "reference"))

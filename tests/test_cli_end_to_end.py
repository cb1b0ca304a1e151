"""The console scripts as a user runs them: a Hydra multirun, then metaloss-report."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(args, cwd, timeout=300, env=None):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    _run(
        [
            BIN / "metaloss-train",
            "-m",
            "task=outliers",
            "loss=mse,mae",
            "seed=0,1",
            "train.steps=50",
            "logger=none",
            "progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert len(list(sweep.rglob("metrics.json"))) == 4
    proc = _run([BIN / "metaloss-report", str(sweep)], tmp_path)
    assert "loss=mse" in proc.stdout and "loss=mae" in proc.stdout and "±" in proc.stdout
    summary = json.loads((sweep / "report.json").read_text())
    assert summary["loss=mse"]["test/mse"]["n"] == 2
    assert (sweep / "report.png").stat().st_size > 1000


@pytest.mark.slow
def test_bad_loss_name_exits_nonzero_with_choices(tmp_path):
    proc = subprocess.run(
        [BIN / "metaloss-train", "loss=nope", "logger=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Available options" in proc.stderr and "huber" in proc.stderr


def test_report_on_empty_directory_is_a_clear_error(tmp_path, capsys):
    from metaloss.cli.report import main

    assert main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


@pytest.mark.slow
def test_built_wheel_carries_the_configs(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "pyproject.toml").is_file() or shutil.which("git") is None:
        pytest.skip("needs the source checkout")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        repo,
    )
    wheel = next(tmp_path.glob("metaloss-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "metaloss/conf/train.yaml" in names and "metaloss/conf/loss/focal.yaml" in names
    assert "metaloss/py.typed" in names  # type checkers read the package's annotations (PEP 561)
    import metaloss  # the version is written once (metaloss/__init__.py), the wheel takes it

    assert wheel.name.startswith(f"metaloss-{metaloss.__version__}-")
    # Installed from that wheel (no source tree beside it), the package finds its configs.
    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        repo,
    )
    code = "import metaloss.config as c; print(c.conf_dir())"
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install
    out = _run([sys.executable, "-c", code], tmp_path, timeout=60, env=env).stdout.strip()
    assert out == str(target / "metaloss" / "conf")


# --- a learned loss and the task it was trained on (issue 15, item 5) ---------------------


def _learned_file(compose_cfg, path, overrides, **meta):
    """A learned-loss file as metaloss-meta writes it, for the setup ``overrides`` compose to
    (no meta-training needed: the file's values are what is under test)."""
    from metaloss.config import training_setup
    from metaloss.losses.io import save_learned_loss
    from metaloss.losses.taylor import TaylorGLO

    cfg = compose_cfg("meta", overrides)
    return save_learned_loss(
        TaylorGLO(),
        path,
        task="digits",
        loss_name="taylorglo",
        steps=1,
        complete=True,
        **({"setup": training_setup(cfg)} | meta),
    )


EVAL = ["logger=none", "progress=false", "compare=[ce]", "meta_test.seeds=2", "meta_test.steps=5"]


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_eval_takes_task_model_and_optimizer_from_the_file(compose_cfg, tmp_path):
    """`metaloss-eval loss_path=...` alone evaluates where the loss was trained (digits, its
    model and inner lr), not on the default sine task (before: silently sine)."""
    f = _learned_file(
        compose_cfg,
        tmp_path / "l.pt",
        ["task=digits", "task.seed=2", "model.hidden=[16]", "optim.lr=0.3"],
    )
    proc = _run(
        [BIN / "metaloss-eval", f"loss_path={f}", *EVAL, f"hydra.run.dir={tmp_path / 'out'}"],
        tmp_path,
    )
    comp = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert comp["task"] == "digits" and comp["metric"] == "test/acc"
    assert comp["hyperparameters"]["learned"]["lr"] == 0.3
    ident = json.loads((tmp_path / "out" / "run.json").read_text())["identity"]
    assert (
        ident["task._target_"] == "metaloss.tasks.classification.digits" and ident["task.seed"] == 2
    )
    assert ident["model.hidden"] == [16] and ident["optim.lr"] == 0.3
    assert "task from" in proc.stdout + proc.stderr


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_eval_refuses_another_task_unless_told_and_old_files_without_a_task(compose_cfg, tmp_path):
    f = _learned_file(compose_cfg, tmp_path / "l.pt", ["task=digits"])
    cmd = [BIN / "metaloss-eval", f"loss_path={f}", *EVAL]
    proc = subprocess.run(
        cmd + ["task=digits", "task.seed=3", f"hydra.run.dir={tmp_path / 'a'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and not (tmp_path / "a" / "comparison.json").exists()
    assert re.search(
        r"l.pt was meta-trained on another task than this run's 'digits': "
        r"task.seed: file 0, this run 3.*"
        r"task.seed=0.*allow_other_task=true",
        proc.stderr,
    ), proc.stderr[-2000:]
    # a file written before the setup was recorded: the implicit case is refused, naming task=
    old = _learned_file(compose_cfg, tmp_path / "old.pt", ["task=digits"], setup=None)
    import torch

    blob = torch.load(old, weights_only=True)
    del blob["meta"]["setup"]
    torch.save(blob, old)
    proc = subprocess.run(
        [BIN / "metaloss-eval", f"loss_path={old}", *EVAL, f"hydra.run.dir={tmp_path / 'b'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and not (tmp_path / "b" / "comparison.json").exists()
    assert "old.pt does not record the task it was trained on" in proc.stderr
    assert "pass the task explicitly, e.g. task=digits" in proc.stderr


def test_train_with_a_learned_loss_on_another_task_needs_allow_other_task(compose_cfg, tmp_path):
    from metaloss.cli import train as train_app
    from metaloss.config import LearnedLossOtherTask

    f = _learned_file(compose_cfg, tmp_path / "l.pt", ["task=digits"])
    base = ["loss=learned", f"loss.path={f}", "logger=none", "progress=false", "train.steps=3"]
    with pytest.raises(
        LearnedLossOtherTask,
        match=r"task 'digits' \(metaloss.tasks.classification.digits\) vs "
        r"this run's 'breast_cancer'.*task=digits.*loss.allow_other_task=true",
    ):
        train_app.run(
            compose_cfg("train", base + ["task=breast_cancer"]), tmp_path / "a", "learned"
        )
    assert not (tmp_path / "a" / "metrics.json").exists()
    train_app.run(compose_cfg("train", base + ["task=digits"]), tmp_path / "b", "learned")
    train_app.run(
        compose_cfg("train", base + ["task=breast_cancer", "loss.allow_other_task=true"]),
        tmp_path / "c",
        "learned",
    )
    assert (tmp_path / "b" / "metrics.json").is_file() and (
        tmp_path / "c" / "metrics.json"
    ).is_file()


def test_meta_records_the_training_setup_in_the_file(compose_cfg, tmp_path):
    from metaloss.cli import meta as meta_app
    from metaloss.losses.io import load_learned_loss

    meta_app.run(
        compose_cfg(
            "meta",
            [
                "task=digits",
                "task.seed=1",
                "loss=taylorglo",
                "model.hidden=[8]",
                "logger=none",
                "progress=false",
                "meta.steps=1",
                "meta.tasks_per_step=1",
                "meta.inner_steps=1",
                "meta_test.enabled=false",
            ],
        ),
        tmp_path,
        "taylorglo",
    )
    setup = load_learned_loss(tmp_path / "learned_loss.pt").meta["setup"]
    assert setup["task"]["target"] == "metaloss.tasks.classification.digits"
    assert setup["task"]["config"]["seed"] == 1 and "_target_" not in setup["task"]["config"]
    assert setup["model"]["config"]["hidden"] == [8] and setup["optim"]["target"].endswith("sgd")


def test_eval_applies_command_line_values_over_the_files_setup(compose_cfg, tmp_path):
    """`optim.lr=...` on the command line sets the lr of the file's optimizer (before: the
    default optimizer replaced the file's, at that lr), `meta_test.seeds=...` keeps the file's
    test-task overrides, and `task=...` alone is what replaces the file's task."""
    from metaloss.cli.eval import given_keys
    from metaloss.config import setup_from_file
    from metaloss.losses.io import load_learned_loss

    f = _learned_file(
        compose_cfg,
        tmp_path / "l.pt",
        [
            "task=sine",
            "optim=adam",
            "optim.lr=0.01",
            "model.hidden=[16]",
            "+meta_test.task_overrides.amplitude=[3,4]",
        ],
    )
    meta = load_learned_loss(f).meta
    cli = [f"loss_path={f}", "optim.lr=0.0005", "meta_test.seeds=3", "model.activation=tanh"]
    cfg = setup_from_file(compose_cfg("eval", cli), meta, given_keys(cli), str(f))
    assert cfg.optim._target_.endswith(".adam") and cfg.optim.lr == 0.0005
    assert list(cfg.model.hidden) == [16] and cfg.model.activation == "tanh"
    assert list(cfg.meta_test.task_overrides.amplitude) == [3, 4] and cfg.meta_test.seeds == 3
    # choosing the group on the command line replaces the file's choice
    chosen = [f"loss_path={f}", "optim=sgd"]
    cfg = setup_from_file(compose_cfg("eval", chosen), meta, given_keys(chosen), str(f))
    assert cfg.optim._target_.endswith(".sgd")


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_a_command_ends_by_saying_where_its_outputs_are(tmp_path):
    """Every command's last line names its run directory; log lines are written around the
    progress bars (through tqdm), never inside a bar's line."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "metaloss.cli.train",
            "debug=default",
            "progress=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"metaloss-train: outputs in {(tmp_path / 'run').resolve()}"
    for segment in (out.stdout + out.stderr).replace("\r", "\n").splitlines():
        assert not ("%|" in segment and "][metaloss][" in segment), segment

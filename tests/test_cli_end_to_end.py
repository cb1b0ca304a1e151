"""The console scripts as a user runs them: a Hydra multirun, then metaloss-report."""

import json
import os
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
    _run([BIN / "metaloss-train", "-m", "task=outliers", "loss=mse,mae", "seed=0,1",
          "train.steps=50", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert len(list(sweep.rglob("metrics.json"))) == 4
    proc = _run([BIN / "metaloss-report", str(sweep)], tmp_path)
    assert "loss=mse" in proc.stdout and "loss=mae" in proc.stdout and "±" in proc.stdout
    summary = json.loads((sweep / "report.json").read_text())
    assert summary["loss=mse"]["test/mse"]["n"] == 2
    assert (sweep / "report.png").stat().st_size > 1000


@pytest.mark.slow
def test_bad_loss_name_exits_nonzero_with_choices(tmp_path):
    proc = subprocess.run([BIN / "metaloss-train", "loss=nope", "logger=none"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
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
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path), str(repo)], repo)
    wheel = next(tmp_path.glob("metaloss-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "metaloss/conf/train.yaml" in names and "metaloss/conf/loss/focal.yaml" in names
    # Installed from that wheel (no source tree beside it), the package finds its configs.
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], repo)
    code = "import metaloss.config as c; print(c.conf_dir())"
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install
    out = _run([sys.executable, "-c", code], tmp_path, timeout=60, env=env).stdout.strip()
    assert out == str(target / "metaloss" / "conf")

"""metaloss-tune killed with SIGKILL (no chance to clean up) resumes from its Optuna journal
when the same command is run again into the same directory, and a finished tune is never
redone nor overwritten (issue 15, item 3). Real processes: slow (three process starts)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY = [
    "task=digits",
    "model.hidden=[16]",
    "optim=sgd",
    "logger=none",
    "progress=false",
    "meta_test.steps=30",
    "meta_test.batch_size=64",
    "tune.seeds=1",
    "compare=[ce,focal]",
    "tune.n_trials=6",
    "threads=1",
]


def _tune(run_dir: Path) -> list[str]:
    return [str(BIN / "metaloss-tune"), *TINY, f"hydra.run.dir={run_dir}"]


@pytest.mark.slow
def test_a_killed_tune_resumes_and_a_finished_one_is_left_alone(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _tune(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tuned = run_dir / "tuned.json"
    deadline = time.monotonic() + 240
    while not tuned.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # ce is tuned and written; focal is under way
    proc.communicate(timeout=60)
    partial = json.loads(tuned.read_text())
    assert not partial["complete"] and list(partial["losses"]) == ["ce"], (
        "killed too late to test a resume"
    )

    again = subprocess.run(_tune(run_dir), capture_output=True, text=True, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "ce: resumed" in log and "6 of 6 trials were done already" in log, log[-3000:]
    assert "ce trial" not in log  # not one ce trial trained again
    done = json.loads(tuned.read_text())
    assert done["complete"] and done["losses"]["ce"] == partial["losses"]["ce"]
    assert done["losses"]["focal"]["n_trials"] == 6 and len(done["losses"]["focal"]["trials"]) == 6

    before = tuned.read_bytes()
    third = subprocess.run(_tune(run_dir), capture_output=True, text=True, timeout=600)
    log = third.stdout + third.stderr
    assert third.returncode == 0 and "is complete" in log and "nothing overwritten" in log, log[
        -3000:
    ]
    assert "trial" not in log.split("is complete")[0].split("tuning")[-1]
    assert tuned.read_bytes() == before

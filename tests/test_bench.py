"""The engine benchmark runs and ends with one JSON line of ratios (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_engine.py"


@pytest.mark.slow
def test_bench_prints_ratios_as_last_line():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "sine_T8_K5", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    r = last["ratios"]["sine_T8_K5"]
    assert r["speedup_engine_vs_higher"] > 0 and r["meta_step_vs_plain_K_steps"] > 0
    assert "sine_T8_K5      engine" in out.stdout


METATEST = Path(__file__).resolve().parents[1] / "scripts" / "bench_metatest.py"


@pytest.mark.slow
def test_metatest_bench_prints_ratios_as_last_line():
    out = subprocess.run(
        [
            sys.executable,
            str(METATEST),
            "--only",
            "mnist1d",
            "--mnist1d-steps",
            "3",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["ratios"]["mnist1d"]["speedup"] > 0


SEARCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_search.py"


@pytest.mark.slow
def test_search_bench_agrees_with_one_at_a_time_and_prints_its_speedup_last():
    out = subprocess.run(
        [sys.executable, str(SEARCH), "--pop", "4", "--seeds", "2", "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0
    assert sum(line.startswith("fitness: max") for line in lines) == 2
    for line in lines:
        if line.startswith("fitness: max"):
            assert float(line.split("= ")[1].split(";")[0]) < 1e-6, line
            assert line.endswith("same diverged trees: True"), line


FEWSHOT = Path(__file__).resolve().parents[1] / "scripts" / "bench_fewshot.py"


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
@pytest.mark.parametrize("loss", ["metal", "ce"])
def test_fewshot_bench_agrees_with_the_loop_and_prints_its_speedup_last(loss):
    out = subprocess.run(
        [
            sys.executable,
            str(FEWSHOT),
            "--meta-batch",
            "2",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--loss",
            loss,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0
    diff = next(line for line in lines if line.startswith("meta-gradient: max |vmap - loop|"))
    assert float(diff.split("= ")[1]) < 1e-4, diff

"""The horizon benchmark runs tiny and ends with one JSON line (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_horizon.py"


@pytest.mark.slow
def test_horizon_bench_prints_json_as_last_line():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--ks", "2,4", "--tasks", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["ks"] == [2, 4]
    for k in ("2", "4"):
        assert set(last["results"][k]) == {"plain", "unrolled", "checkpointed", "implicit", "es"}
        for r in last["results"][k].values():
            assert r["seconds"] > 0 and r["peak_mib"] >= 0 and r["time_vs_plain"] > 0
    assert {"implicit_memory_Kmax_vs_Kmin", "checkpointed_vs_unrolled_memory_Kmax"} <= set(
        last["goals"]
    )


def test_horizon_bench_refuses_unknown_methods():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "unknown methods" in out.stderr

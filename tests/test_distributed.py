"""Meta-batches across processes: 2 gloo processes (torchrun) give the φ of 1 process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
ARGS = [
    "logger=none",
    "progress=false",
    "meta.steps=3",
    "meta.tasks_per_step=5",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta_test.enabled=false",
    "dtype=float64",
]


def _torchrun(n, args, cwd):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            str(BIN / "metaloss-meta"),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [[], ["hypergrad=es", "hypergrad.population=2", "meta_optim.lr=0.05"]],
    ids=["unrolled", "es"],
)
def test_two_gloo_processes_equal_one(tmp_path, method):
    """T=5 over 2 ranks: uneven shares (3 + 2), weighted all-reduce; held-out selection after
    meta-training runs on rank 0 alone, once every rank has closed the process group."""
    method = [
        *method,
        "meta.selection.frac=0.3",
        "meta.selection.every=1",
        "meta.selection.seeds=2",
    ]
    one = subprocess.run(
        [BIN / "metaloss-meta", *ARGS, *method, f"hydra.run.dir={tmp_path / 'one'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, [*ARGS, *method, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    assert "rank 1 of 2 (gloo)" in two.stdout + two.stderr
    out = two.stdout + two.stderr
    closed = [out.find(f"rank {r} of 2: process group closed with the others") for r in (0, 1)]
    assert min(closed) >= 0  # every rank tore the group down together...
    assert closed[0] < out.index("selection: φ of outer step")  # ...before rank 0 went on alone
    a = torch.load(tmp_path / "one" / "learned_loss.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "learned_loss.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)  # summation order only
    # only rank 0 claimed a directory: one run.json, and no stray per-rank directories
    assert sorted(p.parent.name for p in tmp_path.rglob("run.json")) == ["one", "two"]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["app"] == "meta"


@pytest.mark.slow
def test_a_non_finite_streak_stops_every_rank_together_with_a_clear_error(tmp_path):
    # optim.lr=1e300: every inner run overflows, every rank sees the same all-reduced NaN
    two = _torchrun(
        2,
        [
            *ARGS,
            "meta.steps=4",
            "meta.max_bad_steps=2",
            "optim.lr=1e300",
            f"hydra.run.dir={tmp_path / 'x'}",
        ],
        tmp_path,
    )
    out = two.stdout + two.stderr
    assert two.returncode != 0 and "consecutive outer steps gave NaN/inf" in out
    for rank in (0, 1):
        assert f"rank {rank} of 2: process group closed with the others" in out
    assert "terminate called" not in out and "SIGABRT" not in out


@pytest.mark.slow
def test_online_mode_is_refused_across_processes(tmp_path):
    out = _torchrun(2, [*ARGS, "meta.mode=online", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path)
    assert out.returncode != 0 and "cannot be split across 2 processes" in out.stdout + out.stderr


def test_shards_cover_every_task_once():
    from metaloss.distributed import World, shard_bounds

    for n in range(1, 12):
        for size in range(1, n + 1):
            bounds = [shard_bounds(n, World(r, size)) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1

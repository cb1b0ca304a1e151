"""metaloss-report's tidy table and its views, against a hand computation on a crafted sweep:
two meta-training runs (meta-seeds), a diverged test seed, a label with `|`, mixed metrics, a
failed run, a bad --split (issue 21)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metaloss.report import escape_latex, per_meta_seed, pooled, tidy


def _run(root: Path, name: str, overrides: list[str], result: dict | None, file: str):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if result is not None:
        (d / file).write_text(json.dumps(result))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    comp = lambda learned, ce: {  # noqa: E731
        "metric": "test/acc",
        "seeds": [0, 1, 2],
        "results": {"learned": {"test/acc": learned}, "ce": {"test/acc": ce}},
    }
    _run(
        root,
        "m0",
        ["seed=0", "meta.note=a|b"],
        comp([0.6, 0.7, 0.8], [0.5, 0.5, 0.6]),
        "comparison.json",
    )
    _run(
        root,
        "m1",
        ["seed=1", "meta.note=a|b"],
        comp([0.9, None, 0.7], [0.6, 0.4, 0.5]),
        "comparison.json",
    )
    _run(
        root,
        "r0",
        ["seed=0", "loss=mse", "meta.note=reg"],
        {"metrics": {"test/mse": 2.0}},
        "metrics.json",
    )
    _run(
        root,
        "r1",
        ["seed=1", "loss=mse", "meta.note=reg"],
        {"metrics": {"test/mse": 4.0}},
        "metrics.json",
    )
    _run(root, "r2", ["seed=2", "loss=mse", "meta.note=reg"], None, "metrics.json")  # failed
    return root


def test_the_tidy_table_and_its_views_match_a_hand_computation(sweep):
    t = tidy(sweep)
    assert list(t.columns) == ["group", "loss", "meta_seed", "seed", "metric", "value", "status"]
    assert (t["status"] == "diverged").sum() == 1 and (t["status"] == "failed").sum() == 1
    assert set(t["metric"].dropna()) == {"test/acc", "test/mse"}
    runs = per_meta_seed(t)
    learned = runs[(runs["loss"] == "learned")].set_index("meta_seed")
    assert learned.loc["0", "mean"] == pytest.approx(0.7)
    assert learned.loc["1", "mean"] == pytest.approx(0.8)  # over the 2 seeds that did not diverge
    assert learned.loc["1", "n_diverged"] == 1 and learned.loc["1", "n"] == 3
    pool = pooled(t).set_index(["loss", "metric"])
    row = pool.loc[("learned", "test/acc")]
    # run 1 diverged on a seed: counted, not averaged over its survivors (as the main table)
    assert row["mean"] == pytest.approx(0.7) and row["n"] == 2 and row["unit"] == "meta-seeds"
    assert row["std"] == 0.0 and row["n_diverged"] == 1
    ce = pool.loc[("ce", "test/acc")]
    assert ce["std"] == pytest.approx(math.sqrt((1.6 / 3 - 31 / 60) ** 2 + (0.5 - 31 / 60) ** 2))
    assert ce["mean"] == pytest.approx((1.6 / 3 + 1.5 / 3) / 2)  # the two runs' means
    mse = pool.loc[("mse", "test/mse")]
    assert mse["mean"] == pytest.approx(3.0) and mse["unit"] == "seeds" and mse["failed"] == 1


def test_the_cli_writes_every_view_escaped_and_refuses_a_bad_split_before_writing(sweep):
    out = subprocess.run(
        [sys.executable, "-m", "metaloss.cli.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    md = (sweep / "report.md").read_text()
    assert "meta.note=a\\|b" in md and "meta.note=a|b" not in md.replace("a\\|b", "")
    for line in md.splitlines():
        if line.startswith("|"):  # every row has as many columns as its header
            assert line.replace("\\|", "").count("|") in {7, 4, 5}, line
    assert (
        "Per meta-training run" in md
        and "1 run(s) left no result (failed, killed or still running)" in md
    )
    csv = (sweep / "report.csv").read_text().splitlines()
    assert csv[0] == "group,loss,meta_seed,seed,metric,value,status" and len(csv) == 1 + 12 + 2 + 1
    tex = (sweep / "report.tex").read_text()
    assert r"\toprule" in tex and r"a\textbar{}b" in tex and "test/acc" in tex
    before = {p.name: p.read_text() for p in sweep.glob("report.*") if p.suffix != ".png"}
    bad = subprocess.run(
        [sys.executable, "-m", "metaloss.cli.report", str(sweep), "--split", "tset"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--split 'tset'" in bad.stderr and "test" in bad.stderr
    assert {p.name: p.read_text() for p in sweep.glob("report.*") if p.suffix != ".png"} == before


def test_latex_escapes_every_special_character():
    assert escape_latex("a_b & 50% {x} #1 $y ~^ \\ |") == (
        r"a\_b \& 50\% \{x\} \#1 \$y \textasciitilde{}\textasciicircum{} \textbackslash{} "
        r"\textbar{}"
    )

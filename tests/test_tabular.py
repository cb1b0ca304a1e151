"""task=tabular: bundled scikit-learn sets by name, CSV and NPZ files by their documented
layout, the shared transforms, and every malformed source refused naming the file."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine

from metaloss.tasks.tabular import TabularDataError, tabular
from metaloss.validate import ConfigError, check_config


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _binary_rows(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    return x, (x[:, 0] > 0).astype(int)


def test_a_bundled_set_by_name_is_that_set_split_and_standardised():
    task = tabular(source="sklearn:wine", kind="classification", seed=0)
    x, y = load_wine(return_X_y=True)
    n = len(task.x_train) + len(task.x_val) + len(task.x_test)
    assert n == len(x) == 178 and task.num_classes == 3 and task.in_shape == (13,)
    assert torch.allclose(task.x_train.mean(0), torch.zeros(13), atol=1e-5)  # train statistics
    counts = torch.bincount(torch.cat([task.y_train, task.y_val, task.y_test]), minlength=3)
    assert counts.tolist() == np.bincount(y).tolist()
    other = tabular(source="sklearn:wine", kind="classification", seed=1)
    assert task.x_test.shape == other.x_test.shape  # the test rows stay, train/val re-split
    assert not torch.equal(task.y_train, other.y_train)


def test_a_csv_with_text_labels_and_a_named_target_column(tmp_path):
    x, y = _binary_rows()
    rows = [[*r[:2], ["no", "yes"][int(label)], *r[2:]] for r, label in zip(x, y, strict=True)]
    path = _write_csv(tmp_path / "d.csv", ["a", "b", "answer", "c", "d"], rows)
    task = tabular(source=str(path), kind="binary", target="answer", standardize_x=False)
    assert task.kind == "binary" and task.in_shape == (4,) and task.info["classes"] == ["no", "yes"]
    assert len(task.info["sha256"]) == 64
    all_x = torch.cat([task.x_train, task.x_val, task.x_test])
    all_y = torch.cat([task.y_train, task.y_val, task.y_test])
    # the label column is taken out, every other column kept in order: 'yes' rows have a > 0
    assert torch.equal(all_y == 1, all_x[:, 0] > 0)


def test_numeric_labels_sort_as_numbers_and_a_regression_target_is_standardised(tmp_path):
    rows = [[i, str([2, 10, 1][i % 3])] for i in range(60)]
    task = tabular(
        source=str(_write_csv(tmp_path / "c.csv", ["x", "y"], rows)), kind="classification"
    )
    assert task.info["classes"] == ["1", "2", "10"]
    rng = np.random.default_rng(1)
    reg = [[v, 3 * v + 100] for v in rng.normal(size=80)]
    task = tabular(source=str(_write_csv(tmp_path / "r.csv", ["x", "t"], reg)), kind="regression")
    assert task.y_train.shape[1] == 1 and abs(float(task.y_train.mean())) < 1e-5


def test_an_npz_in_the_documented_layout(tmp_path):
    x, y = _binary_rows()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    task = tabular(source=str(tmp_path / "d.npz"), kind="binary", imbalance_ratio=5)
    counts = torch.bincount(task.y_train, minlength=2)
    assert int(counts.max()) >= 4 * int(counts.min())  # the shared imbalance transform ran


@pytest.mark.parametrize(
    "header, rows, kw, match",
    [
        (
            ["a", "label"],
            [[1, "x"], ["oops", "y"]],
            {},
            "line 3, column 'a': 'oops' is not a number",
        ),
        (["a", "label"], [[1, "x"], [2]], {}, "line 3: 1 cells, the header has 2"),
        (["a", "a"], [[1, 2]], {}, "name every column once"),
        (
            ["a", "label"],
            [[1, "x"], [2, "y"]],
            {"target": "class"},
            "not a column.*columns: a, label",
        ),
        (["a", "label"], [[1, "x"], [2, ""]], {}, "empty cells"),
        (["a", "label"], [[1, "x"], ["nan", "y"]], {}, "not finite"),
        (["a", "label"], [[i, i % 3] for i in range(30)], {"kind": "binary"}, "exactly 2 classes"),
        (["a", "label"], [[i, "x"] for i in range(30)], {}, "one class only"),
        (
            ["a", "t"],
            [[i, i] for i in range(30)],
            {"kind": "regression", "imbalance_ratio": 3},
            "not to a regression",
        ),
    ],
)
def test_a_malformed_csv_is_refused_naming_file_line_and_column(tmp_path, header, rows, kw, match):
    path = _write_csv(tmp_path / "bad.csv", header, rows)
    kw = {"kind": "classification", **kw}
    with pytest.raises(TabularDataError, match=match):
        tabular(source=str(path), **kw)


def test_a_malformed_npz_is_refused(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(TabularDataError, match="needs arrays x and y; missing \\['x'\\]"):
        tabular(source=str(tmp_path / "a.npz"), kind="classification")
    np.savez(tmp_path / "b.npz", x=np.array([[object()]] * 4, dtype=object), y=np.zeros(4))
    with pytest.raises(TabularDataError, match="not a readable NPZ"):  # no pickle is loaded
        tabular(source=str(tmp_path / "b.npz"), kind="classification")
    np.savez(tmp_path / "c.npz", x=np.zeros((6, 2)), y=np.array([0, 2, 0, 2, 0, 2]))
    with pytest.raises(TabularDataError, match="classes \\[1\\] have no example"):
        tabular(source=str(tmp_path / "c.npz"), kind="classification")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["task.source=sklearn:boston"],
            "task.source = 'sklearn:boston': must be one of sklearn:iris",
        ),
        (["task.source=missing.csv"], "task.source = 'missing.csv'"),
        (["task.kind=ordinal"], "task.kind = 'ordinal'"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(compose_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(compose_cfg("train", ["task=tabular", *overrides]))


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_metaloss_train_on_a_csv_file_from_config_alone(tmp_path):
    x, y = _binary_rows(300)
    rows = [[*r, int(label)] for r, label in zip(x, y, strict=True)]
    path = _write_csv(tmp_path / "d.csv", ["a", "b", "c", "d", "label"], rows)
    exe = Path(sys.executable).parent / "metaloss-train"
    out = subprocess.run(
        [
            str(exe),
            "task=tabular",
            f"task.source={path}",
            "task.kind=binary",
            "train.steps=300",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test/acc=" in out.stderr + out.stdout
    bad = _write_csv(tmp_path / "bad.csv", ["a", "label"], [[1, 0], ["x", 1]])
    out = subprocess.run(
        [
            str(exe),
            "task=tabular",
            f"task.source={bad}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'r2'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "line 3, column 'a'" in out.stderr

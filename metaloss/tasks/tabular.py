"""Any tabular data set by config: a scikit-learn bundled set by name, or a CSV / NPZ file.

    metaloss-train task=tabular task.source=sklearn:wine task.kind=classification
    metaloss-train task=tabular task.source=data/houses.csv task.target=price task.kind=regression
    metaloss-meta  task=tabular task.source=data/cells.npz task.kind=binary

Sources (``source``):

* ``sklearn:<name>``: one of :data:`SKLEARN` (the sets scikit-learn ships inside the package,
  so nothing is downloaded). Nothing else is looked up by name: a config is data and names no
  code.
* a ``.csv`` file: a header row naming the columns, one example per row; ``target`` names the
  target column (default: the last one), every other column is a feature and must be a
  number in every row. A classification target may be numbers or text; its distinct values,
  sorted, become classes 0..C-1 (``info["classes"]`` keeps them). Empty cells are refused.
* a ``.npz`` file (``numpy.savez``): array ``x`` of shape ``[N, ...]`` (features, a number
  dtype) and ``y`` of shape ``[N]`` (class indices 0..C-1, or regression targets; ``[N, D]``
  for D regression outputs). No other layout, and no pickled objects
  (``allow_pickle=False``).

Then the transforms every task shares: the seeded three-way split (the test rows are the
same for every ``seed``: :func:`metaloss.tasks.base.three_way_split`), standardisation of
the features (and of a regression target) by training-split statistics, and for
classification the training-split label noise and imbalance of
:func:`metaloss.tasks.base.finish_classification`. A file's SHA-256 is kept in
``info["sha256"]``, so two runs on different contents under one path can be told apart.
Every problem with a file or its columns is a :class:`TabularDataError` naming the file and
what to fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import datasets

from metaloss.tasks.base import Task, finish_classification, standardize, three_way_split

KINDS = ("classification", "binary", "regression")
SKLEARN: dict[str, Callable[..., Any]] = {  # bundled with scikit-learn: no download
    "iris": datasets.load_iris,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
    "digits": datasets.load_digits,
    "diabetes": datasets.load_diabetes,
}
MAX_FILE_BYTES = 2 * 2**30  # a larger file is refused before it is read


class TabularDataError(ValueError):
    """A tabular source that cannot be read as documented (the message names it)."""


def tabular(
    *,
    source: str,
    kind: str,
    target: str | None = None,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.2,
    standardize_x: bool = True,
    standardize_y: bool = True,
    label_noise: Any = None,
    imbalance_ratio: float | None = None,
    imbalance_profile: str = "rank",
) -> Task:
    """A task from ``source`` (see the module docstring); ``kind``: classification, binary
    (exactly two classes) or regression; ``target``: the CSV target column (default: last);
    ``standardize_x`` / ``standardize_y``: scale features / a regression target by
    training-split statistics; ``label_noise``, ``imbalance_ratio``, ``imbalance_profile``:
    as for the other classification tasks (classification and binary only)."""
    if kind not in KINDS:
        raise TabularDataError(f"task.kind = {kind!r}: must be one of {', '.join(KINDS)}")
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise TabularDataError(
            f"task.val_frac = {val_frac}, task.test_frac = {test_frac}: each in (0, 1), "
            "their sum below 1"
        )
    regression = kind == "regression"
    if regression and (label_noise or imbalance_ratio):
        raise TabularDataError(
            "task.label_noise / task.imbalance_ratio apply to classes: not to a regression task"
        )
    x, y, info = _read(source, target, regression)
    name = source[len("sklearn:") :] if source.startswith("sklearn:") else Path(source).stem
    if regression:
        y = y.float().reshape(len(y), -1)
    else:
        num_classes = int(y.max()) + 1
        if kind == "binary" and num_classes != 2:
            raise TabularDataError(
                f"{source}: task.kind = binary needs exactly 2 classes, the target has "
                f"{num_classes}; use task.kind=classification"
            )
        if num_classes < 2:
            raise TabularDataError(f"{source}: the target has one class only: nothing to learn")
    splits = three_way_split(x, y, val_frac=val_frac, test_frac=test_frac, seed=seed)
    (xtr, ytr), (xva, yva), (xte, yte) = splits
    for split, ys in (("train", ytr), ("validation", yva), ("test", yte)):
        if len(ys) == 0:
            raise TabularDataError(
                f"{source}: {len(x)} rows leave the {split} split empty with val_frac = "
                f"{val_frac}, test_frac = {test_frac}"
            )
    if standardize_x:
        xtr, xva, xte = standardize(xtr, xva, xte)
    if regression:
        if standardize_y:
            ytr, yva, yte = standardize(ytr, yva, yte)
        return Task(name, "regression", xtr, ytr, xva, yva, xte, yte, info=info)
    return finish_classification(
        name,
        kind,
        (xtr, ytr),
        (xva, yva),
        (xte, yte),
        num_classes=num_classes,
        seed=seed,
        label_noise_cfg=label_noise,
        imbalance_ratio=imbalance_ratio,
        imbalance_profile=imbalance_profile,
        info=info,
    )


def _read(
    source: str, target: str | None, regression: bool
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if not isinstance(source, str) or not source:
        raise TabularDataError(f"task.source = {source!r}: a file path or sklearn:<name>")
    if source.startswith("sklearn:"):
        name = source[len("sklearn:") :]
        if name not in SKLEARN:
            raise TabularDataError(
                f"task.source = {source!r}: not a bundled scikit-learn data set; valid: "
                + ", ".join(f"sklearn:{n}" for n in SKLEARN)
            )
        if target is not None:
            raise TabularDataError(f"task.target = {target!r}: only a CSV file has named columns")
        xs, ys = SKLEARN[name](return_X_y=True)
        x = torch.tensor(np.asarray(xs, dtype=np.float32)).reshape(len(xs), -1)
        y = torch.tensor(ys) if not regression else torch.tensor(ys, dtype=torch.float32)
        return x, y, {"source": source}
    path = Path(source).expanduser()
    if not path.is_file():
        raise TabularDataError(f"task.source = {source!r}: no such file (nor sklearn:<name>)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TabularDataError(f"{path}: larger than {MAX_FILE_BYTES // 2**30} GiB")
    data = path.read_bytes()  # read once: hashed, then parsed from memory
    info: dict[str, Any] = {"source": str(path), "sha256": hashlib.sha256(data).hexdigest()}
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x, y, classes = _read_csv(path, data, target, regression)
        if classes is not None:
            info["classes"] = classes
        return x, y, info
    if suffix == ".npz":
        if target is not None:
            raise TabularDataError(f"task.target = {target!r}: an NPZ file holds x and y only")
        return (*_read_npz(path, data, regression), info)
    raise TabularDataError(f"{path}: a .csv or .npz file is expected (or sklearn:<name>)")


def _read_csv(
    path: Path, data: bytes, target: str | None, regression: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    except (csv.Error, UnicodeDecodeError) as e:
        raise TabularDataError(f"{path}: not a readable CSV file ({e})") from e
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise TabularDataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or any(not h for h in header):
        raise TabularDataError(f"{path}: the header row must name every column once: {header}")
    if len(header) < 2:
        raise TabularDataError(f"{path}: needs at least one feature column and a target column")
    col = len(header) - 1 if target is None else None
    if target is not None:
        if target not in header:
            raise TabularDataError(
                f"task.target = {target!r}: not a column of {path}; columns: {', '.join(header)}"
            )
        col = header.index(target)
    assert col is not None
    features, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise TabularDataError(
                f"{path}, line {line}: {len(row)} cells, the header has {len(header)}"
            )
        values = []
        for j, cell in enumerate(row):
            if j == col:
                continue
            values.append(_number(cell, path, line, header[j]))
        features.append(values)
        labels.append(row[col].strip())
    x = torch.tensor(features, dtype=torch.float32)
    if regression:
        y = torch.tensor([_number(v, path, i + 2, header[col]) for i, v in enumerate(labels)])
        return x, y.float(), None
    if any(not v for v in labels):
        raise TabularDataError(f"{path}: the target column {header[col]!r} has empty cells")
    try:  # numeric labels sort as numbers (2 before 10), others as text
        classes = sorted(set(labels), key=float)
    except ValueError:
        classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return x, torch.tensor([index[v] for v in labels]), classes


def _number(cell: str, path: Path, line: int, column: str) -> float:
    try:
        v = float(cell)
    except ValueError:
        raise TabularDataError(
            f"{path}, line {line}, column {column!r}: {cell!r} is not a number (features "
            "must be numbers; encode categories first)"
        ) from None
    if not math.isfinite(v):
        raise TabularDataError(f"{path}, line {line}, column {column!r}: {cell!r} is not finite")
    return v


def _read_npz(path: Path, data: bytes, regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise TabularDataError(
                    f"{path}: an NPZ task needs arrays x and y; missing {sorted(missing)} "
                    f"(it has {sorted(arrays.files)})"
                )
            xs, ys = arrays["x"], arrays["y"]
    except TabularDataError:
        raise
    except (ValueError, OSError) as e:  # pickled objects, a corrupt archive
        raise TabularDataError(f"{path}: not a readable NPZ of number arrays ({e})") from e
    if xs.dtype.kind not in "biuf" or ys.dtype.kind not in "biuf":
        raise TabularDataError(f"{path}: x and y must hold numbers (dtypes {xs.dtype}, {ys.dtype})")
    if xs.ndim < 2 or len(xs) != len(ys):
        raise TabularDataError(
            f"{path}: x must be [N, features...] and y [N] with the same N; got x "
            f"{list(xs.shape)}, y {list(ys.shape)}"
        )
    if not np.isfinite(xs).all() or not np.isfinite(ys).all():
        raise TabularDataError(f"{path}: x and y must be finite (no NaN or inf)")
    x = torch.tensor(xs.astype(np.float32))
    if regression:
        return x, torch.tensor(ys.astype(np.float32))
    if ys.ndim != 1 or (ys != np.round(ys)).any() or ys.min() < 0:
        raise TabularDataError(
            f"{path}: a classification y must be [N] class indices 0..C-1 (whole numbers >= 0)"
        )
    y = torch.tensor(ys.astype(np.int64))
    absent = sorted(set(range(int(y.max()) + 1)) - set(y.tolist()))
    if absent:
        raise TabularDataError(f"{path}: classes {absent} have no example (y must use 0..C-1)")
    return x, y

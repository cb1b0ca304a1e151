"""Tasks give seeded deterministic splits with the declared kind; models fit them."""

import pytest
import torch
from hydra.utils import instantiate

from metaloss.config import group_options
from metaloss.tasks.base import imbalance, label_noise
from metaloss.train import build_model

EXPECTED_KIND = {
    "sine": "regression",
    "outliers": "regression",
    "diabetes": "regression",
    "digits": "classification",
    "mnist1d": "classification",
    "breast_cancer": "binary",
    "shapes": "segmentation",
}
MODEL_FOR = {"regression": "mlp", "classification": "mlp", "binary": "mlp", "segmentation": "unet"}


@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_every_task_config_is_deterministic_and_fits_a_model(compose_cfg, name):
    assert name in group_options("task")
    cfg = compose_cfg("train", [f"task={name}", f"model={MODEL_FOR[EXPECTED_KIND[name]]}"])
    a, b = instantiate(cfg.task), instantiate(cfg.task)
    assert a.kind == EXPECTED_KIND[name]
    for split in ("train", "val", "test"):
        torch.testing.assert_close(a.split(split)[0], b.split(split)[0])
        torch.testing.assert_close(a.split(split)[1], b.split(split)[1])
    other = instantiate(cfg.task, seed=1)
    assert not torch.equal(a.x_val, other.x_val) or not torch.equal(a.y_val, other.y_val)
    model = build_model(instantiate(cfg.model), a, seed=0)
    out = model(a.x_train[:4])
    if a.kind == "segmentation":
        assert out.shape == a.y_train[:4].shape
    else:
        assert out.shape == (4, a.out_dim)


def test_mnist1d_sizes_match_the_paper_split(compose_cfg):
    t = instantiate(compose_cfg("train", ["task=mnist1d"]).task)
    assert len(t.x_train) + len(t.x_val) == 4000 and len(t.x_test) == 1000
    assert len(t.x_val) == 500 and t.in_shape == (40,) and t.num_classes == 10


def test_outliers_corrupt_training_targets_only(compose_cfg):
    t = instantiate(compose_cfg("train", ["task=outliers", "task.fraction=0.3"]).task)
    clean = lambda x: 2 * torch.sin(x) + 0.5 * x  # noqa: E731
    frac = ((t.y_train - clean(t.x_train)).abs() > 5).float().mean()
    assert 0.2 < frac < 0.4
    assert ((t.y_test - clean(t.x_test)).abs() < 3).all()
    assert ((t.y_val - clean(t.x_val)).abs() < 3).all()


def test_binary_imbalance_reaches_the_ratio(compose_cfg):
    cfg = compose_cfg(
        "train", ["task=mnist1d", "task.positive_classes=[0]", "task.imbalance_ratio=99"]
    )
    t = instantiate(cfg.task)
    counts = t.class_counts
    assert t.kind == "binary" and t.out_dim == 1
    assert counts[0] / counts[1] == pytest.approx(99, rel=0.05)
    assert (t.y_test == 1).float().mean() > 0.05  # test split is untouched


def test_multiclass_imbalance_is_long_tailed():
    x = torch.randn(1000, 3)
    y = torch.arange(10).repeat(100)
    _, y2 = imbalance(x, y, ratio=10, num_classes=10, seed=0, binary=False)
    counts = torch.bincount(y2, minlength=10)
    assert counts.max() == 100 and counts.min() == 10
    assert (counts.sort(descending=True).values.diff() <= 0).all()


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_label_noise_rate_and_kind(kind):
    y = torch.arange(10).repeat(500)
    noisy = label_noise(y, rate=0.3, kind=kind, num_classes=10, seed=0)
    flipped = noisy != y
    assert 0.27 < flipped.float().mean() < 0.33
    if kind == "pair":
        assert torch.equal(noisy[flipped], (y[flipped] + 1) % 10)
    with pytest.raises(ValueError, match="rate"):
        label_noise(y, rate=1.5, kind=kind, num_classes=10, seed=0)


def test_label_noise_applies_to_training_split_only(compose_cfg):
    clean = instantiate(compose_cfg("train", ["task=digits"]).task)
    noisy = instantiate(compose_cfg("train", ["task=digits", "task.label_noise.rate=0.4"]).task)
    assert 0.3 < (clean.y_train != noisy.y_train).float().mean() < 0.5
    assert torch.equal(clean.y_test, noisy.y_test) and torch.equal(clean.y_val, noisy.y_val)


def test_models_have_no_batchnorm_running_stats(compose_cfg):
    for name in group_options("model"):
        task_name = {"unet": "shapes", "convnet": "digits", "cnn1d": "mnist1d"}.get(name, "digits")
        cfg = compose_cfg("train", [f"model={name}", f"task={task_name}"])
        task = instantiate(cfg.task)
        model = build_model(instantiate(cfg.model), task, seed=0)
        assert not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
        assert not list(model.buffers())


def test_model_shape_errors_are_clear():
    from metaloss.models import cnn1d, unet

    with pytest.raises(ValueError, match="unet expects"):
        unet(in_shape=(40,), out_dim=1)
    with pytest.raises(ValueError, match="cnn1d expects"):
        cnn1d(in_shape=(1, 8, 8), out_dim=10)


def test_task_labels_are_checked_where_data_enters():
    import pytest
    import torch

    from metaloss.tasks.base import Task

    x = torch.zeros(4, 2)
    ok = torch.tensor([0, 1, 2, 1])
    Task("t", "classification", x, ok, x, ok, x, ok, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*got \[0, 5\]"):
        Task("t", "classification", x, torch.tensor([0, 1, 5, 1]), x, ok, x, ok, num_classes=3)
    with pytest.raises(ValueError, match="labels must lie in"):
        Task(
            "t",
            "binary",
            x,
            torch.tensor([0, 2, 1, 0]),
            x,
            ok.clamp(max=1),
            x,
            ok.clamp(max=1),
            num_classes=2,
        )
    with pytest.raises(ValueError, match="integer class indices"):
        Task("t", "classification", x, ok.float(), x, ok, x, ok, num_classes=3)
    m = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        Task("t", "segmentation", m, m + 0.5, m, m, m, m)

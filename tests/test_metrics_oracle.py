"""Oracle tests: `metaloss.metrics.evaluate` against scikit-learn and hand-computed masks."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from metaloss.losses import fixed
from metaloss.metrics import METRICS_BY_KIND, evaluate, metric_names, train_result_names
from metaloss.tasks.regression import sine
from metaloss.train import build_model, train_model


def _sk_classification(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    # sklearn's defaults are the definitions we mean: balanced accuracy averages recall over
    # the classes present in y_true; macro F1 over the classes present in y_true or y_pred.
    return {
        "acc": skm.accuracy_score(y, pred),
        "balanced_acc": skm.balanced_accuracy_score(y, pred),
        "macro_f1": skm.f1_score(y, pred, average="macro"),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("absent", [None, "pred", "target", "both"])
def test_multiclass_matches_sklearn(seed, absent):
    g = torch.Generator().manual_seed(seed)
    c, n = 5, 40
    out = torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    if absent in ("pred", "both"):
        out[:, 3] = -1e9  # class 3 is never predicted
    if absent in ("target", "both"):
        y[y == 1] = 2  # class 1 never occurs in the targets
    m = evaluate("classification", out, y, num_classes=c)
    want = _sk_classification(out.argmax(-1).numpy(), y.numpy())
    for k, v in want.items():
        assert m[f"test/{k}"] == pytest.approx(v, abs=1e-6), k


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("case", ["random", "all_positive", "all_negative"])
def test_binary_matches_sklearn(seed, case):
    g = torch.Generator().manual_seed(seed)
    n = 30
    out = torch.randn(n, 1, generator=g)
    if case == "all_positive":
        out = out.abs() + 0.1  # class 0 absent from predictions
    elif case == "all_negative":
        out = -out.abs() - 0.1  # class 1 absent from predictions
    y = (torch.rand(n, generator=g) < 0.3).long()
    y[:2] = torch.tensor([0, 1])  # both classes present in the targets
    counts = torch.tensor([int((y == 0).sum()), int((y == 1).sum())])
    m = evaluate("binary", out, y, class_counts=counts, prefix="val")
    pred = (out.reshape(-1) > 0).long().numpy()
    want = _sk_classification(pred, y.numpy())
    minority = int(counts.argmin())
    want["minority_recall"] = skm.recall_score(y.numpy(), pred, pos_label=minority)
    assert set(m) == set(metric_names("binary", "val"))
    for k, v in want.items():
        assert m[f"val/{k}"] == pytest.approx(v, abs=1e-6), k


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_binary_minority_defaults_to_class_one_and_absent_class_is_nan():
    out = torch.tensor([[1.0], [-1.0], [1.0]])
    y = torch.tensor([0, 0, 1])
    assert evaluate("binary", out, y)["test/minority_recall"] == 1.0  # class 1, no counts
    # Recall of a class with no examples is undefined: NaN, where sklearn's
    # zero_division convention would invent a number.
    m = evaluate("binary", out, torch.tensor([0, 0, 0]), class_counts=torch.tensor([5, 2]))
    assert math.isnan(m["test/minority_recall"])
    assert m["test/balanced_acc"] == pytest.approx(
        skm.balanced_accuracy_score([0, 0, 0], [1, 0, 1])
    )


def test_segmentation_dice_iou_by_hand():
    # Three 2x3 images: a partial overlap, an empty target with an empty prediction
    # (a perfect image, dice = iou = 1), an empty prediction on a non-empty target (0).
    target = torch.tensor(
        [[[1, 1, 0], [0, 1, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 1], [0, 0, 0]]]
    ).float()[:, None]
    pred_mask = torch.tensor(
        [[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]
    ).float()[:, None]
    logits = pred_mask * 4 - 2  # thresholded at 0
    # image 0: tp = 2, fp = 1, fn = 1 -> dice 4/6, iou 2/4
    dice = [4 / 6, 1.0, 0.0]
    iou = [2 / 4, 1.0, 0.0]
    m = evaluate("segmentation", logits, target)
    assert m["test/dice"] == pytest.approx(sum(dice) / 3)
    assert m["test/iou"] == pytest.approx(sum(iou) / 3)
    # a false positive on an empty target is a wrong image, not a perfect one
    fp_only = evaluate("segmentation", torch.full((1, 1, 2, 3), 2.0), torch.zeros(1, 1, 2, 3))
    assert fp_only == {"test/dice": 0.0, "test/iou": 0.0}


def test_regression_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(50, 1, generator=g), torch.randn(50, 1, generator=g)
    m = evaluate("regression", out, y)
    assert m["test/mse"] == pytest.approx(skm.mean_squared_error(y, out), rel=1e-5)
    assert m["test/mae"] == pytest.approx(skm.mean_absolute_error(y, out), rel=1e-5)


@pytest.mark.parametrize("kind", sorted(METRICS_BY_KIND))
def test_metric_names_are_what_evaluate_returns(kind):
    from metaloss import kinds

    if kinds.get(kind).own_loop:  # the task's own loop scores: its train() gives the names
        _own_loop_names(kind)
        return
    out = (
        torch.randn(8, 1, 2, 2)
        if kind == "segmentation"
        else torch.randn(8, 3 if kind == "classification" else 1)
    )
    y = (
        (torch.rand(8, 1, 2, 2) > 0.5).float()
        if kind == "segmentation"
        else torch.randint(0, 3 if kind == "classification" else 2, (8,))
    )
    assert list(evaluate(kind, out, y, prefix="val")) == metric_names(kind, "val")
    with pytest.raises(ValueError, match="unknown task kind"):
        metric_names("nope")


def _own_loop_names(kind: str) -> None:
    from metaloss.gan.losses import non_saturating
    from metaloss.gan.task import GAN
    from metaloss.rl.losses import reinforce
    from metaloss.rl.task import CartPole

    task, loss = {
        "gan": (GAN(steps=2, batch=8, hidden=4, samples=16), non_saturating()),
        "policy": (
            CartPole(updates=1, episodes=2, max_steps=5, eval_episodes=2, hidden=4),
            reinforce,
        ),
    }[kind]
    got = task.train(loss, lr=1e-3, seed=0)
    assert sorted(got) == sorted(metric_names(kind, "test") + metric_names(kind, "val"))
    with pytest.raises(TypeError, match="loop of their own"):
        evaluate(kind, torch.zeros(2, 1), torch.zeros(2))


def test_train_result_names_are_what_train_model_returns():
    task = sine(seed=0, n_train=16, n_val=8, n_test=8)

    def factory(in_shape, out_dim):
        return torch.nn.Linear(in_shape[0], out_dim)

    model = build_model(factory, task, 0)
    m = train_model(
        task,
        model,
        fixed.mse,
        lambda p: torch.optim.SGD(p, lr=0.01),
        steps=2,
        batch_size=None,
        seed=0,
        progress=False,
    )
    assert list(m) == train_result_names("regression")

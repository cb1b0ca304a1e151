"""Oracle tests for the fixed-loss catalogue: PyTorch references, identities, extremes."""

import pytest
import torch
from torch import nn

from metaloss.losses import fixed as L

g = torch.Generator().manual_seed(0)
B, C = 16, 5
F64 = torch.float64
REG_PRED, REG_T = (
    torch.randn(B, 3, generator=g, dtype=F64),
    torch.randn(B, 3, generator=g, dtype=F64),
)
LOGITS, LABELS = torch.randn(B, C, generator=g, dtype=F64), torch.randint(0, C, (B,), generator=g)
BIN_Z, BIN_Y = torch.randn(B, generator=g, dtype=F64), torch.randint(0, 2, (B,), generator=g)


@pytest.fixture(autouse=True)
def _float64():
    """Oracle comparisons in double precision; conftest restores the default afterwards."""
    torch.set_default_dtype(torch.float64)


def per_example(ref):
    return ref.reshape(B, -1).mean(1)


@pytest.mark.parametrize(
    "ours,ref",
    [
        (L.mse, nn.MSELoss(reduction="none")),
        (L.mae, nn.L1Loss(reduction="none")),
        (lambda p, t: L.huber(p, t, delta=0.7), nn.HuberLoss(reduction="none", delta=0.7)),
        (lambda p, t: L.smooth_l1(p, t, beta=0.5), nn.SmoothL1Loss(reduction="none", beta=0.5)),
        (L.poisson, nn.PoissonNLLLoss(reduction="none", log_input=True)),
    ],
)
def test_regression_matches_torch(ours, ref):
    torch.testing.assert_close(ours(REG_PRED, REG_T), per_example(ref(REG_PRED, REG_T)))


def test_log_cosh_and_quantile_closed_forms():
    r = REG_PRED - REG_T
    torch.testing.assert_close(L.log_cosh(REG_PRED, REG_T), per_example(torch.log(torch.cosh(r))))
    q = L.quantile(REG_PRED, REG_T, tau=0.9)
    torch.testing.assert_close(q, per_example(torch.where(r < 0, -0.9 * r, 0.1 * r)))
    torch.testing.assert_close(L.quantile(REG_PRED, REG_T, tau=0.5), 0.5 * L.mae(REG_PRED, REG_T))


def test_ce_matches_torch_with_weight_and_smoothing():
    w = torch.rand(C, generator=g) + 0.1
    ref = nn.CrossEntropyLoss(reduction="none")(LOGITS, LABELS)
    torch.testing.assert_close(L.ce(LOGITS, LABELS), ref)
    ref = nn.CrossEntropyLoss(weight=w, reduction="none", label_smoothing=0.2)(LOGITS, LABELS)
    torch.testing.assert_close(
        L._soft_ce(torch.log_softmax(LOGITS, -1), LABELS, weight=w, label_smoothing=0.2), ref
    )
    ref = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)(LOGITS, LABELS)
    torch.testing.assert_close(L.label_smoothing(LOGITS, LABELS, epsilon=0.1), ref)


def test_weighted_ce_schemes_match_torch_weights():
    counts = torch.tensor([50.0, 10, 5, 30, 5])
    for scheme, w in [
        ("balanced", counts.sum() / (C * counts)),
        ("inverse", (1 / counts) * C / (1 / counts).sum()),
    ]:
        ref = nn.CrossEntropyLoss(weight=w, reduction="none")(LOGITS, LABELS)
        torch.testing.assert_close(
            L.weighted_ce(LOGITS, LABELS, scheme=scheme, class_counts=counts), ref
        )
    eff = L.weighted_ce(LOGITS, LABELS, scheme="effective", beta=0.99, class_counts=counts)
    assert eff.shape == (B,) and torch.isfinite(eff).all()
    with pytest.raises(ValueError, match="class_counts"):
        L.weighted_ce(LOGITS, LABELS)


def test_binary_losses_match_bce_with_logits():
    ref = nn.BCEWithLogitsLoss(reduction="none")(BIN_Z, BIN_Y.double())
    torch.testing.assert_close(L.bce(BIN_Z, BIN_Y), ref)
    torch.testing.assert_close(L.ce(BIN_Z, BIN_Y), ref)  # one logit = two-class (0, z)
    torch.testing.assert_close(L.ce(BIN_Z[:, None], BIN_Y), ref)  # [B, 1] too
    ref = nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor(3.0))(
        BIN_Z, BIN_Y.double()
    )
    torch.testing.assert_close(L.bce(BIN_Z, BIN_Y, pos_weight=3.0), ref)


@pytest.mark.parametrize("p,margin", [(1, 1.0), (2, 0.5)])
def test_hinge_matches_multimargin(p, margin):
    ours = L.hinge if p == 1 else L.squared_hinge
    ref = nn.MultiMarginLoss(p=p, margin=margin, reduction="none")(LOGITS, LABELS)
    torch.testing.assert_close(ours(LOGITS, LABELS, margin=margin), ref)


def test_binary_hinge_uses_plus_minus_one_labels():
    s = 2.0 * BIN_Y - 1.0
    torch.testing.assert_close(L.hinge(BIN_Z, BIN_Y), torch.relu(1 - s * BIN_Z))
    torch.testing.assert_close(L.squared_hinge(BIN_Z, BIN_Y), torch.relu(1 - s * BIN_Z) ** 2)


def test_classification_identities():
    ce = L.ce(LOGITS, LABELS)
    torch.testing.assert_close(L.focal(LOGITS, LABELS, gamma=0.0), ce)
    torch.testing.assert_close(L.poly1(LOGITS, LABELS, epsilon=0.0), ce)
    pt = torch.softmax(LOGITS, -1)[torch.arange(B), LABELS]
    torch.testing.assert_close(L.focal(LOGITS, LABELS, gamma=2.0), (1 - pt) ** 2 * ce)
    torch.testing.assert_close(L.gce(LOGITS, LABELS, q=1.0), 1 - pt)  # q=1: MAE on p_t
    torch.testing.assert_close(L.gce(LOGITS, LABELS, q=1e-6), ce, rtol=1e-4, atol=1e-5)  # q->0: CE
    counts = torch.full((C,), 7.0)  # equal counts: class-balanced weights are all 1
    torch.testing.assert_close(
        L.class_balanced_focal(LOGITS, LABELS, class_counts=counts), L.focal(LOGITS, LABELS)
    )
    # binary focal alpha weights positives by alpha and negatives by 1 - alpha
    f = L.focal(BIN_Z, BIN_Y, alpha=0.25, gamma=0.0)
    torch.testing.assert_close(f, torch.where(BIN_Y == 1, 0.25, 0.75) * L.bce(BIN_Z, BIN_Y))


SEG_LOGITS = torch.randn(4, 1, 8, 8, generator=g, dtype=F64) * 3
SEG_MASK = (torch.rand(4, 1, 8, 8, generator=g) < 0.2).double()


def test_segmentation_identities():
    torch.testing.assert_close(
        L.tversky(SEG_LOGITS, SEG_MASK, alpha=0.5, beta=0.5, smooth=0.0),
        L.dice(SEG_LOGITS, SEG_MASK, smooth=0.0),
    )
    hard = (SEG_MASK * 2 - 1) * 200 + (
        torch.rand(4, 1, 8, 8, generator=g, dtype=F64) < 0.1
    ) * 400  # hard masks
    d = 1 - L.dice(hard, SEG_MASK, smooth=0.0)
    j = 1 - L.iou(hard, SEG_MASK, smooth=0.0)
    assert (d < 1).all()  # the perturbation makes the masks differ
    torch.testing.assert_close(d, 2 * j / (1 + j))
    perfect = (SEG_MASK * 2 - 1) * 200
    torch.testing.assert_close(L.dice(perfect, SEG_MASK), torch.zeros(4))
    pix = nn.BCEWithLogitsLoss(reduction="none")(SEG_LOGITS, SEG_MASK).reshape(4, -1).mean(1)
    torch.testing.assert_close(L.bce_dice(SEG_LOGITS, SEG_MASK), pix + L.dice(SEG_LOGITS, SEG_MASK))
    torch.testing.assert_close(
        L.focal_tversky(SEG_LOGITS, SEG_MASK, gamma=1.0),
        L.tversky(SEG_LOGITS, SEG_MASK, alpha=0.7, beta=0.3),
    )


CLS_LOSSES = [
    L.ce,
    L.focal,
    L.poly1,
    L.label_smoothing,
    L.gce,
    L.hinge,
    L.squared_hinge,
    lambda p, t: L.weighted_ce(p, t, class_counts=torch.tensor([90.0, 5, 5, 1, 1])),
    lambda p, t: L.class_balanced_focal(p, t, class_counts=torch.tensor([90.0, 5, 5, 1, 1])),
]


@pytest.mark.parametrize("loss", CLS_LOSSES)
@pytest.mark.parametrize("scale", [1e3, -1e3])
def test_classification_gradients_finite_at_extremes(loss, scale):
    """p_true -> 1 (scale > 0) and p_true -> 0 (scale < 0): saturated softmax."""
    logits = (scale * torch.nn.functional.one_hot(LABELS, C).double()).requires_grad_()
    out = loss(logits, LABELS)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss", [L.mse, L.mae, L.huber, L.smooth_l1, L.log_cosh, L.quantile])
def test_regression_gradients_finite_at_huge_residuals(loss):
    pred = torch.tensor([[1e6], [-1e6], [0.0]], requires_grad=True)
    out = loss(pred, torch.zeros(3, 1))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("loss", [L.dice, L.iou, L.tversky, L.focal_tversky, L.bce_dice])
@pytest.mark.parametrize("scale", [1e3, -1e3])
def test_segmentation_gradients_finite_at_extremes(loss, scale):
    logits = ((SEG_MASK * 2 - 1) * scale).requires_grad_()
    out = loss(logits, SEG_MASK)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()


def test_every_loss_declares_kinds():
    from metaloss.config import group_options, losses_for

    assert {"mse", "mae", "huber", "smooth_l1", "log_cosh", "quantile", "poisson"} <= set(
        losses_for("regression")
    )
    assert "ce" not in losses_for("regression") and "mse" not in losses_for("classification")
    assert "dice" in losses_for("segmentation") and "dice" not in losses_for("regression")
    assert "bce" in losses_for("binary") and "bce" not in losses_for("classification")
    fixed_names = {n for n in group_options("loss") if hasattr(L, n)}
    assert len(fixed_names) == 26

"""Each parametric family follows the contract and equals its known loss at the initial φ."""

import pytest
import torch
from hydra.utils import instantiate

from metaloss.config import instantiate_loss
from metaloss.losses import fixed as L
from metaloss.losses.io import CorruptLossFile, load_learned_loss, save_learned_loss
from metaloss.losses.logit_adjusted import LogitAdjusted
from metaloss.losses.mlp import ML3Loss
from metaloss.losses.poly import PolyN
from metaloss.losses.robust import AdaptiveRobust
from metaloss.losses.smoothing import LearnedSmoothing
from metaloss.losses.taylor import TaylorGLO

g = torch.Generator().manual_seed(0)
B, C = 12, 4
LOGITS, LABELS = torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g)
BIN_Z, BIN_Y = torch.randn(B, 1, generator=g), torch.randint(0, 2, (B,), generator=g)
PRED, TARGET = torch.randn(B, 2, generator=g) * 3, torch.randn(B, 2, generator=g)


def test_poly_n_at_zero_is_ce_and_poly1_at_one():
    torch.testing.assert_close(PolyN(degree=3)(LOGITS, LABELS), L.ce(LOGITS, LABELS))
    torch.testing.assert_close(
        PolyN(degree=1, init_epsilon=[1.0])(LOGITS, LABELS), L.poly1(LOGITS, LABELS, epsilon=1.0)
    )
    torch.testing.assert_close(PolyN(degree=2)(BIN_Z, BIN_Y), L.bce(BIN_Z, BIN_Y))


def test_logit_adjusted_at_init_is_ce():
    torch.testing.assert_close(LogitAdjusted(num_classes=C)(LOGITS, LABELS), L.ce(LOGITS, LABELS))
    torch.testing.assert_close(LogitAdjusted(num_classes=2)(BIN_Z, BIN_Y), L.bce(BIN_Z, BIN_Y))
    la = LogitAdjusted(num_classes=C)
    with torch.no_grad():
        la.log_weight.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = torch.nn.CrossEntropyLoss(weight=w, reduction="none")(LOGITS, LABELS)
    torch.testing.assert_close(la(LOGITS, LABELS), ref)


def test_logit_adjusted_with_tau_is_the_logit_adjusted_loss_at_that_tau():
    counts = torch.tensor([50.0, 20.0, 5.0, 1.0])
    for tau in (0.0, 0.37, 1.5):
        torch.testing.assert_close(
            LogitAdjusted(num_classes=C, tau=tau)(LOGITS, LABELS, class_counts=counts),
            L.logit_adjusted_ce(LOGITS, LABELS, tau=tau, class_counts=counts),
        )
    torch.testing.assert_close(
        LogitAdjusted(num_classes=2, tau=0.6)(BIN_Z, BIN_Y, class_counts=[99, 1]),
        L.logit_adjusted_ce(BIN_Z, BIN_Y, tau=0.6, class_counts=[99, 1]),
    )
    with pytest.raises(ValueError, match="class counts"):  # τ ≠ 0 needs the prior
        LogitAdjusted(num_classes=C, tau=1.0)(LOGITS, LABELS)
    for bad in (-1.0, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="tau = .*must be a number >= 0"):
            LogitAdjusted(num_classes=C, tau=bad)


def test_logit_adjusted_tau_is_saved_with_the_loss(tmp_path):
    counts = torch.tensor([50.0, 20.0, 5.0, 1.0])
    la = LogitAdjusted(num_classes=C, tau=0.5)
    with torch.no_grad():
        la.shift.add_(0.1)
    back = load_learned_loss(save_learned_loss(la, tmp_path / "la.pt"))
    assert back.init_kwargs["tau"] == 0.5
    torch.testing.assert_close(
        back(LOGITS, LABELS, class_counts=counts), la(LOGITS, LABELS, class_counts=counts)
    )


def test_learned_smoothing_at_init_is_label_smoothing():
    for per_class in (False, True):
        ls = LearnedSmoothing(init_epsilon=0.1, per_class=per_class, num_classes=C)
        torch.testing.assert_close(
            ls(LOGITS, LABELS), L.label_smoothing(LOGITS, LABELS, epsilon=0.1)
        )


def test_adaptive_robust_is_pseudo_huber_at_alpha_1_and_half_mse_near_2():
    r = PRED - TARGET
    ar = AdaptiveRobust(init_alpha=1.0, init_scale=1.5)
    torch.testing.assert_close(
        ar(PRED, TARGET), (1.5**2 * (torch.sqrt(1 + (r / 1.5) ** 2) - 1)).mean(-1)
    )
    # Huber-like: within 1% of Huber(δ=c) for small residuals
    small = torch.full((3, 1), 0.05)
    torch.testing.assert_close(
        ar(small, torch.zeros(3, 1)),
        L.huber(small, torch.zeros(3, 1), delta=1.5),
        rtol=1e-2,
        atol=0,
    )
    near2 = AdaptiveRobust(init_alpha=1.99999, alpha_max=1.999995).double()  # converges as b log b
    p, t = PRED.double() / 3, TARGET.double()
    torch.testing.assert_close(near2(p, t), 0.5 * L.mse(p, t), rtol=1e-3, atol=1e-8)


def test_taylorglo_mse_init_is_brier_up_to_a_constant():
    tg = TaylorGLO(init="mse")
    onehot = torch.nn.functional.one_hot(LABELS, C).float()
    brier = ((torch.softmax(LOGITS, -1) - onehot) ** 2).sum(-1)
    torch.testing.assert_close(tg(LOGITS, LABELS), brier - 1.0)  # dropped Σ t² = 1
    torch.testing.assert_close(tg(PRED, TARGET), L.mse(PRED, TARGET) - (TARGET**2).mean(-1))


def test_taylorglo_ce_init_is_the_taylor_expansion_of_ce():
    """At the centre, every p-derivative up to 3rd order (and the mixed ones) equals CE's."""
    t0, p0 = 1.0, 0.4
    tg = TaylorGLO(init="ce", center_target=t0, center_pred=p0).double()
    ce = lambda t, p: -t * torch.log(p)  # noqa: E731

    def derivatives(f):
        t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
        p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
        (dp,) = torch.autograd.grad(f(t, p), p, create_graph=True)
        (dpp, dtp) = torch.autograd.grad(dp, (p, t), create_graph=True)
        (dppp, dtpp) = torch.autograd.grad(dpp, (p, t))
        return torch.stack([dp, dpp, dtp, dppp, dtpp])

    torch.testing.assert_close(derivatives(tg.polynomial), derivatives(ce))
    assert len([p for p in tg.parameters()]) == 8


def test_ml3_shapes_and_context():
    ml3 = ML3Loss(hidden=(8, 8))
    assert ml3(PRED, TARGET).shape == (B,) and (ml3(PRED, TARGET) >= 0).all()
    assert ml3(LOGITS, LABELS).shape == (B,) and ml3(BIN_Z, BIN_Y).shape == (B,)
    ctx = ML3Loss(hidden=(8,), use_x=True, x_dim=3, use_progress=True)
    x = torch.randn(B, 3)
    a, b = ctx(PRED, TARGET, x=x, t=0.0), ctx(PRED, TARGET, x=x, t=1.0)
    assert not torch.allclose(a, b)  # progress actually feeds the network
    with pytest.raises(ValueError, match="x_dim"):
        ctx(PRED, TARGET)


@pytest.mark.parametrize(
    "name,task",
    [
        ("ml3", "sine"),
        ("taylorglo", "digits"),
        ("poly_n", "digits"),
        ("logit_adjusted", "digits"),
        ("adaptive_robust", "outliers"),
        ("learned_smoothing", "digits"),
        ("ml3", "digits"),
    ],
)
def test_configs_instantiate_for_their_task_and_save_load(compose_cfg, tmp_path, name, task):
    cfg = compose_cfg("train", [f"loss={name}", f"task={task}"])
    t = instantiate(cfg.task)
    loss = instantiate_loss(cfg.loss, t)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = t.x_train[:5], t.y_train[:5]
    pred = torch.randn(5, t.out_dim)
    path = save_learned_loss(loss, tmp_path / "l.pt", task=task)
    back = load_learned_loss(path)
    torch.testing.assert_close(back(pred, y, x=x, t=0.5), loss(pred, y, x=x, t=0.5).detach())
    assert not any(p.requires_grad for p in back.parameters())


def test_corrupt_or_foreign_loss_files_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptLossFile, match="not a readable"):
        load_learned_loss(bad)
    torch.save(
        {
            "format": "metaloss.learned_loss/1",
            "target": "torch.nn.Linear",
            "init_kwargs": {"in_features": 1, "out_features": 1},
            "state_dict": {},
        },
        bad,
    )
    with pytest.raises(CorruptLossFile, match="not trusted"):
        load_learned_loss(bad)
    good = save_learned_loss(PolyN(degree=2), tmp_path / "good.pt")
    good.write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(CorruptLossFile):
        load_learned_loss(good)
    with pytest.raises(FileNotFoundError):
        load_learned_loss(tmp_path / "missing.pt")


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_ml3_can_start_from_a_known_loss_and_reloads_without_refitting(tmp_path):
    """fit_to regresses the random network onto CE / MSE: approximate, not exact."""
    torch.manual_seed(0)  # the network's starting weights
    ce_like = ML3Loss(fit_to="ce")
    logits, labels = torch.randn(512, 10, generator=g), torch.randint(0, 10, (512,), generator=g)
    a, b = ce_like(logits, labels).detach(), L.ce(logits, labels)
    assert (a - b).abs().mean() / b.mean() < 0.05
    random_init = ML3Loss()(logits, labels).detach()
    assert (random_init - b).abs().mean() / b.mean() > 0.5  # the fit is what made it CE-like
    mse_like = ML3Loss(fit_to="mse")
    p, t = torch.randn(512, 1, generator=g), torch.randn(512, 1, generator=g)
    assert (mse_like(p, t).detach() - L.mse(p, t)).abs().mean() / L.mse(p, t).mean() < 0.1
    path = save_learned_loss(ce_like, tmp_path / "ml3.pt")
    back = load_learned_loss(path)
    torch.testing.assert_close(back(logits, labels), a)

"""Issue 8, parts 4-5: the long-tail / label-noise baselines (logit_adjusted_ce,
balanced_softmax, symmetric_ce, mae_cls) and the learned segmentation loss LearnedTversky,
against hand-written formulas, identities with the existing catalogue, extremes, vmap, the
config rules, and one real meta-training run through metaloss-meta."""

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.func import functional_call, grad, vmap

from metaloss.config import instantiate_loss, losses_for, parametric_losses
from metaloss.losses import fixed as L
from metaloss.losses.io import load_learned_loss, save_learned_loss
from metaloss.losses.segmentation import LearnedTversky
from metaloss.validate import problems

F64 = torch.float64
B, C = 16, 5
g = torch.Generator().manual_seed(8)
LOGITS = torch.randn(B, C, generator=g, dtype=F64) * 2
LABELS = torch.randint(0, C, (B,), generator=g)
COUNTS = torch.tensor([500, 120, 40, 9, 1])  # integer, as Task.class_counts gives them
BIN_Z, BIN_Y = torch.randn(B, generator=g, dtype=F64) * 2, torch.randint(0, 2, (B,), generator=g)
BIN_COUNTS = torch.tensor([97, 3])
SEG_LOGITS = torch.randn(4, 1, 8, 8, generator=g, dtype=F64) * 3
SEG_MASK = (torch.rand(4, 1, 8, 8, generator=g) < 0.2).double()

NEW_FIXED = ["logit_adjusted_ce", "balanced_softmax", "symmetric_ce", "mae_cls"]
NEEDS_COUNTS = {"logit_adjusted_ce", "balanced_softmax"}


def call(name, pred, target, counts=None, **kw):
    if name in NEEDS_COUNTS:
        kw["class_counts"] = (
            counts
            if counts is not None
            else (BIN_COUNTS if pred.ndim == 1 or pred.shape[-1] == 1 else COUNTS)
        )
    return getattr(L, name)(pred, target, **kw)


def ref_ce(logits, y):
    return nn.CrossEntropyLoss(reduction="none")(logits, y)


def two_class(z):
    return torch.stack([torch.zeros_like(z), z], dim=-1)


# ------------------------------------------------------------ references and identities


def test_logit_adjusted_ce_matches_its_formula_and_identities():
    prior = COUNTS.double() / COUNTS.sum()
    for tau in (0.5, 1.0, 2.0):
        ref = ref_ce(LOGITS + tau * prior.log(), LABELS)  # Menon et al. eq. (10)
        torch.testing.assert_close(
            L.logit_adjusted_ce(LOGITS, LABELS, tau=tau, class_counts=COUNTS), ref
        )
    torch.testing.assert_close(
        L.logit_adjusted_ce(LOGITS, LABELS, tau=0.0, class_counts=COUNTS), L.ce(LOGITS, LABELS)
    )
    # tau = 1 is balanced softmax (the prior's normaliser is a constant shift of every logit)
    torch.testing.assert_close(
        L.logit_adjusted_ce(LOGITS, LABELS, tau=1.0, class_counts=COUNTS),
        L.balanced_softmax(LOGITS, LABELS, class_counts=COUNTS),
    )
    # counts as a plain list work too (a user's context)
    torch.testing.assert_close(
        L.logit_adjusted_ce(LOGITS, LABELS, class_counts=COUNTS.tolist()),
        L.logit_adjusted_ce(LOGITS, LABELS, class_counts=COUNTS),
    )


def test_balanced_softmax_matches_its_formula_and_equal_counts_give_ce():
    ref = ref_ce(LOGITS + COUNTS.double().log(), LABELS)  # Ren et al. eq. (4)
    torch.testing.assert_close(L.balanced_softmax(LOGITS, LABELS, class_counts=COUNTS), ref)
    equal = torch.full((C,), 37)
    torch.testing.assert_close(
        L.balanced_softmax(LOGITS, LABELS, class_counts=equal), L.ce(LOGITS, LABELS)
    )


def test_symmetric_ce_matches_its_formula_and_identities():
    p = torch.softmax(LOGITS, -1)
    q = torch.nn.functional.one_hot(LABELS, C).double()
    log_q = torch.where(
        q > 0, torch.log(q.clamp_min(1e-300)), torch.tensor(-4.0, dtype=F64)
    )  # A = -4
    rce = -(p * log_q).sum(-1)  # Wang et al. eq. (5), the literal sum over classes
    ours = L.symmetric_ce(LOGITS, LABELS, alpha=0.3, beta=1.7)
    torch.testing.assert_close(ours, 0.3 * ref_ce(LOGITS, LABELS) + 1.7 * rce)
    torch.testing.assert_close(
        L.symmetric_ce(LOGITS, LABELS, alpha=0.3, beta=0.0), 0.3 * L.ce(LOGITS, LABELS)
    )
    # RCE = -A (1 - p_y) = 2 * mae_cls for A = -4
    torch.testing.assert_close(
        L.symmetric_ce(LOGITS, LABELS, alpha=0.0, beta=1.0), 2 * L.mae_cls(LOGITS, LABELS)
    )
    # the authors' code clamps the one-hot at 1e-4: log_zero = log(1e-4)
    log_q4 = torch.log(q.clamp(1e-4, 1.0))
    torch.testing.assert_close(
        L.symmetric_ce(LOGITS, LABELS, alpha=0.0, beta=1.0, log_zero=math.log(1e-4)),
        -(p * log_q4).sum(-1),
    )


def test_mae_cls_is_the_l1_distance_to_the_one_hot():
    p = torch.softmax(LOGITS, -1)
    q = torch.nn.functional.one_hot(LABELS, C).double()
    l1 = (p - q).abs().sum(-1)  # Ghosh et al.: ||p - e_y||_1
    torch.testing.assert_close(L.mae_cls(LOGITS, LABELS), l1)
    torch.testing.assert_close(L.mae_cls(LOGITS, LABELS), 2 * (1 - p[torch.arange(B), LABELS]))
    torch.testing.assert_close(L.mae_cls(LOGITS, LABELS), 2 * L.gce(LOGITS, LABELS, q=1.0))
    # the regression mae is untouched: still elementwise |pred - target| on floats
    r_pred, r_t = torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    torch.testing.assert_close(L.mae(r_pred, r_t), (r_pred - r_t).abs().mean(-1))
    assert L.mae.kinds == {"regression"} and L.mae_cls.kinds == {"classification", "binary"}


def test_binary_one_logit_equals_the_two_class_form():
    two = two_class(BIN_Z)
    for name in NEW_FIXED:
        for pred in (BIN_Z, BIN_Z[:, None]):
            torch.testing.assert_close(
                call(name, pred, BIN_Y), call(name, two, BIN_Y, counts=BIN_COUNTS)
            )
    # and against explicit binary formulas
    p1 = torch.sigmoid(BIN_Z)
    p_y = torch.where(BIN_Y == 1, p1, 1 - p1)
    torch.testing.assert_close(L.mae_cls(BIN_Z, BIN_Y), 2 * (1 - p_y))
    torch.testing.assert_close(
        L.logit_adjusted_ce(BIN_Z, BIN_Y, tau=0.0, class_counts=BIN_COUNTS), L.bce(BIN_Z, BIN_Y)
    )
    shift = math.log(3 / 97)  # balanced softmax on one logit: BCE on z + log(n1 / n0)
    torch.testing.assert_close(
        L.balanced_softmax(BIN_Z, BIN_Y, class_counts=BIN_COUNTS), L.bce(BIN_Z + shift, BIN_Y)
    )


def test_counts_are_required_checked_and_clamped():
    for name in NEEDS_COUNTS:
        with pytest.raises(ValueError, match=rf"^{name}: needs the training split's class counts"):
            getattr(L, name)(LOGITS, LABELS)
        with pytest.raises(ValueError, match=rf"^{name}: class_counts .*one count per class \({C}"):
            getattr(L, name)(LOGITS, LABELS, class_counts=[5, 5])
        with pytest.raises(ValueError, match=rf"^{name}: class_counts .*\(2 for logits \[{B}\]"):
            getattr(L, name)(BIN_Z, BIN_Y, class_counts=[5, 5, 5])
        # a class absent from the training split counts as 1, not log 0 = -inf
        out = getattr(L, name)(LOGITS, LABELS, class_counts=torch.tensor([10, 0, 3, 4, 5]))
        ref = getattr(L, name)(LOGITS, LABELS, class_counts=torch.tensor([10, 1, 3, 4, 5]))
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", NEW_FIXED)
def test_shape_mistakes_are_refused(name):
    for pred, target in [
        (torch.zeros(B, C), torch.zeros(B, 1, dtype=torch.long)),  # [B, 1] labels
        (torch.zeros(B, C), torch.zeros(B + 1, dtype=torch.long)),  # batch mismatch
        (torch.zeros(B, C, 2), torch.zeros(B, dtype=torch.long)),
    ]:  # 3-D logits
        with pytest.raises(
            ValueError, match=rf"^{name}: .*{list(pred.shape)}.*{list(target.shape)}"
        ):
            call(name, pred, target, counts=COUNTS)
    with pytest.raises(ValueError, match=rf"^{name}: .*integer class indices"):
        call(name, torch.zeros(B, C), torch.zeros(B), counts=COUNTS)


@pytest.mark.parametrize("name", NEW_FIXED)
@pytest.mark.parametrize("scale", [1e3, -1e3])
def test_gradients_finite_at_extreme_logits(name, scale):
    """p_y -> 1 (scale > 0) and p_y -> 0 (scale < 0), multi-class and one binary logit."""
    logits = (scale * torch.nn.functional.one_hot(LABELS, C).double()).requires_grad_()
    out = call(name, logits, LABELS)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    z = (scale * (2.0 * BIN_Y - 1)).double().requires_grad_()
    out = call(name, z, BIN_Y)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", NEW_FIXED)
def test_under_vmap_with_per_task_counts(name):
    """Tasks stacked as metaloss.train_many does: per-task logits, labels and class counts."""
    T = 3
    preds = torch.randn(T, B, C, generator=g, dtype=F64)
    labels = torch.randint(0, C, (T, B), generator=g)
    counts = torch.randint(1, 50, (T, C), generator=g)
    batched = vmap(lambda p, y, n: call(name, p, y, counts=n))(preds, labels, counts)
    looped = torch.stack([call(name, p, y, counts=n) for p, y, n in zip(preds, labels, counts)])
    torch.testing.assert_close(batched, looped)
    # and the gradient of a linear model under vmap(grad(...)), as the inner loop takes it
    x = torch.randn(T, B, 4, generator=g, dtype=F64)
    w = torch.zeros(4, C, dtype=F64)
    gw = vmap(
        grad(lambda w, x, y, n: call(name, x @ w, y, counts=n).mean()), in_dims=(None, 0, 0, 0)
    )(w, x, labels, counts)
    for t in range(T):
        wt = w.clone().requires_grad_()
        call(name, x[t] @ wt, labels[t], counts=counts[t]).mean().backward()
        torch.testing.assert_close(gw[t], wt.grad)


def test_configs_compose_instantiate_and_are_catalogued(compose_cfg):
    for name in NEW_FIXED:
        assert name in losses_for("classification") and name in losses_for("binary")
        assert name not in losses_for("regression")
        cfg = compose_cfg("train", [f"loss={name}", "task=digits"])
        assert problems(cfg) == []
        t = instantiate(cfg.task)
        loss = instantiate_loss(cfg.loss, t)
        out = loss(torch.randn(6, t.out_dim), t.y_train[:6], class_counts=t.class_counts)
        assert out.shape == (6,) and torch.isfinite(out).all()
    assert (
        "learned_tversky" in losses_for("segmentation") and "learned_tversky" in parametric_losses()
    )
    assert "learned_tversky" not in losses_for("classification")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("loss.tau=-0.5", "loss.tau = -0.5: must be a number >= 0"),
        ("loss.alpha=-1", "loss.alpha = -1: must be a number >= 0"),
        ("loss.beta=-0.1", "loss.beta = -0.1: must be a number >= 0"),
        ("loss.log_zero=1.0", "loss.log_zero = 1.0: must be a number < 0"),
        ("loss.init_alpha=0", "loss.init_alpha = 0: must be a number > 0"),
        ("loss.init_gamma=-1", "loss.init_gamma = -1: must be a number > 0"),
        ("loss.init_w=1.0", "loss.init_w = 1.0: must be a number in (0, 1)"),
        ("loss.smooth=-1", "loss.smooth = -1: must be a number >= 0"),
    ],
)
def test_config_rules_refuse_bad_hyper_parameters(compose_cfg, override, needle):
    name = {
        "tau": "logit_adjusted_ce",
        "alpha": "symmetric_ce",
        "beta": "symmetric_ce",
        "log_zero": "symmetric_ce",
    }.get(override.split("=")[0].split(".")[1], "learned_tversky")
    task = "shapes" if name == "learned_tversky" else "digits"
    assert problems(compose_cfg("train", [f"loss={name}", f"task={task}"])) == []
    found = problems(compose_cfg("train", [f"loss={name}", f"task={task}", override]))
    assert any(needle in line for line in found), found


# ------------------------------------------------------------ the learned segmentation loss


def test_learned_tversky_at_init_is_bce_dice_and_its_region_term_is_dice():
    lt = LearnedTversky().double()
    torch.testing.assert_close(lt(SEG_LOGITS, SEG_MASK), L.bce_dice(SEG_LOGITS, SEG_MASK))
    bce, region = lt.terms(SEG_LOGITS, SEG_MASK)
    torch.testing.assert_close(region, L.dice(SEG_LOGITS, SEG_MASK))
    pix = nn.BCEWithLogitsLoss(reduction="none")(SEG_LOGITS, SEG_MASK).reshape(4, -1).mean(1)
    torch.testing.assert_close(bce, pix)
    for smooth in (0.0, 2.5):
        lt = LearnedTversky(smooth=smooth).double()
        torch.testing.assert_close(
            lt(SEG_LOGITS, SEG_MASK), L.bce_dice(SEG_LOGITS, SEG_MASK, smooth=smooth)
        )
    # float32 too (the default dtype of a run), within float tolerance
    lt32 = LearnedTversky()
    torch.testing.assert_close(
        lt32(SEG_LOGITS.float(), SEG_MASK.float()), L.bce_dice(SEG_LOGITS.float(), SEG_MASK.float())
    )
    c = lt32.coefficients()
    for k, v in {"alpha": 0.5, "beta": 0.5, "gamma": 1.0, "w": 0.5}.items():
        torch.testing.assert_close(c[k], torch.tensor(v))


def test_learned_tversky_region_term_is_focal_tversky_and_mixes_linearly():
    lt = LearnedTversky(
        init_alpha=0.7, init_beta=0.3, init_gamma=0.75, init_w=0.2, smooth=2.0
    ).double()
    bce, region = lt.terms(SEG_LOGITS, SEG_MASK)
    ref = L.focal_tversky(SEG_LOGITS, SEG_MASK, alpha=0.7, beta=0.3, gamma=0.75, smooth=1.0)  # s/2
    torch.testing.assert_close(region, ref)
    torch.testing.assert_close(lt(SEG_LOGITS, SEG_MASK), 2.0 * (0.2 * bce + 0.8 * region))
    # w -> 1 is (scale x) pixel BCE, w -> 0 the region term: the family spans both
    near_bce = LearnedTversky(init_w=1 - 1e-12).double()
    torch.testing.assert_close(near_bce(SEG_LOGITS, SEG_MASK), 2.0 * bce)
    near_dice = LearnedTversky(init_w=1e-12, scale=1.0).double()
    torch.testing.assert_close(near_dice(SEG_LOGITS, SEG_MASK), L.dice(SEG_LOGITS, SEG_MASK))


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("scale", [1e3, -1e3])
def test_learned_tversky_gradients_finite_at_extremes(gamma, scale):
    """Perfect (scale > 0: region term 0, where x^γ for γ < 1 has an infinite slope) and
    completely wrong predictions: finite values and gradients in pred and in φ."""
    lt = LearnedTversky(init_gamma=gamma).double()
    logits = ((SEG_MASK * 2 - 1) * scale).requires_grad_()
    out = lt(logits, SEG_MASK)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in lt.parameters())


def test_learned_tversky_phi_gets_gradients_and_works_under_vmap_functional_call():
    lt = LearnedTversky(init_alpha=0.6, init_beta=0.4, init_gamma=1.3, init_w=0.3)
    phi = {k: v.detach() for k, v in lt.named_parameters()}
    T = 3
    preds = torch.randn(T, 4, 1, 8, 8, generator=g)
    masks = (torch.rand(T, 4, 1, 8, 8, generator=g) < 0.2).float()

    def mean_loss(phi, p, m):
        return functional_call(lt, phi, (p, m)).mean()

    batched = vmap(lambda p, m: functional_call(lt, phi, (p, m)))(preds, masks)
    looped = torch.stack([lt(p, m) for p, m in zip(preds, masks)]).detach()
    torch.testing.assert_close(batched, looped)
    grads = vmap(grad(mean_loss), in_dims=(None, 0, 0))(phi, preds, masks)
    assert set(grads) == {"raw_alpha", "raw_beta", "raw_gamma", "mix_logit"}
    assert all(torch.isfinite(v).all() and (v != 0).any() for v in grads.values())
    with pytest.raises(ValueError, match=r"^LearnedTversky: .*\[4, 1, 8, 8\].*\[4, 8, 8\]"):
        lt(preds[0], masks[0, :, 0])


def test_learned_tversky_refuses_bad_arguments_and_saves_and_loads(tmp_path):
    for kw in (
        {"init_alpha": 0.0},
        {"init_gamma": -1.0},
        {"init_w": 0.0},
        {"init_w": 1.0},
        {"scale": 0.0},
        {"smooth": -1.0},
    ):
        with pytest.raises(ValueError, match=f"LearnedTversky: {next(iter(kw))}"):
            LearnedTversky(**kw)
    lt = LearnedTversky(init_alpha=0.7, smooth=0.5)
    with torch.no_grad():
        for p in lt.parameters():
            p.add_(0.1)
    back = load_learned_loss(save_learned_loss(lt, tmp_path / "lt.pt", task="shapes"))
    torch.testing.assert_close(
        back(SEG_LOGITS.float(), SEG_MASK.float()),
        lt(SEG_LOGITS.float(), SEG_MASK.float()).detach(),
    )


def test_segmentation_losses_can_be_drawn(tmp_path):
    from metaloss.plots import loss_curves, plot_losses

    _, curves, _ = loss_curves({"learned": LearnedTversky(), "dice": L.dice}, "segmentation")
    assert set(curves) == {"learned", "dice"}
    plot_losses({"learned": LearnedTversky(), "dice": L.dice}, "segmentation", tmp_path / "l.png")


@pytest.mark.parametrize(
    "kind,counts",
    [("binary", [3158, 31]), ("binary", [31, 3158]), ("classification", [350, 200, 3, 90])],
)
def test_class_count_losses_are_drawn_at_the_rarest_class(kind, counts):
    """weighted CE, logit adjustment and balanced softmax need the class counts: the plots used
    to call them without, get NaN and leave them out of every imbalance experiment's picture."""
    from metaloss.losses.base import binary_as_two_class
    from metaloss.plots import loss_curves

    counts = torch.tensor(counts, dtype=torch.float)
    losses = {
        "weighted_ce": L.weighted_ce,
        "logit_adjusted_ce": L.logit_adjusted_ce,
        "balanced_softmax": L.balanced_softmax,
        "ce": L.ce,
    }
    x, curves, label = loss_curves(losses, kind, num_classes=len(counts), class_counts=counts)
    rare = int(counts.argmin())
    assert set(curves) == set(losses) and all(
        bool(torch.isfinite(y).all()) for y in curves.values()
    )
    assert f"class {rare}, the rarest" in label and len(label) < 60  # fits under the axis
    # the curves are each loss at p_true of the rarest class (CE: exactly -log p_true)
    torch.testing.assert_close(curves["ce"], -x.log(), rtol=1e-4, atol=1e-5)
    z = torch.logit(x)[:, None] if kind == "binary" else None
    pred = (
        (z if rare == 1 else -z)
        if kind == "binary"
        else torch.where(
            torch.arange(len(counts)) == rare,
            x.log()[:, None],
            ((1 - x) / (len(counts) - 1)).log()[:, None],
        )
    )
    target = torch.full((len(x),), rare)
    assert torch.softmax(binary_as_two_class(pred), -1)[:, rare].sub(x).abs().max() < 1e-4
    torch.testing.assert_close(
        curves["weighted_ce"], L.weighted_ce(pred, target, class_counts=counts)
    )
    # about balanced counts (label noise on MNIST-1D): the usual picture, class 0, no "rarest"
    _, balanced, label = loss_curves(
        losses, kind, num_classes=len(counts), class_counts=torch.full_like(counts, 300.0)
    )
    assert "rarest" not in label and all(bool(torch.isfinite(y).all()) for y in balanced.values())


def test_learned_tversky_meta_trains_through_the_app(compose_cfg, tmp_path):
    from metaloss.cli import meta as meta_app

    cfg = compose_cfg(
        "meta",
        [
            "task=shapes",
            "model=unet",
            "loss=learned_tversky",
            "task.n_train=16",
            "task.n_val=8",
            "task.n_test=8",
            "task.size=16",
            "meta.steps=2",
            "meta.tasks_per_step=1",
            "meta.inner_steps=2",
            "meta_test.enabled=false",
            "logger=none",
            "progress=false",
        ],
    )
    before = instantiate(cfg.loss).state_dict()
    meta_app.run(cfg, tmp_path, "learned_tversky")
    learned = load_learned_loss(tmp_path / "learned_loss.pt")
    assert isinstance(learned, LearnedTversky)
    after = learned.state_dict()
    assert set(after) == set(before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize(
    "overrides",
    [
        ["task=breast_cancer", "loss=logit_adjusted_ce", "loss.tau=1.5"],
        ["task=digits", "loss=balanced_softmax"],
    ],
)
def test_count_based_losses_train_through_the_app(compose_cfg, tmp_path, overrides):
    """metaloss-train hands the training split's class counts to the loss context."""
    from metaloss.cli import train as train_app

    cfg = compose_cfg(
        "train",
        ["logger=none", "progress=false", "train.steps=30", "train.eval_every=10"] + overrides,
    )
    value = train_app.run(cfg, tmp_path, overrides[1][5:])
    assert 0.0 <= value <= 1.0

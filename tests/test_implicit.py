"""Long-horizon hypergradients: implicit (Neumann, CG) against the closed form of ridge
regression and a long unrolled run; checkpointed unrolling equal to plain unrolling."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metaloss.hypergrad.base import LR_KEY, MetaBatch, MetaProblem, meta_params
from metaloss.hypergrad.checkpointed import Checkpointed
from metaloss.hypergrad.implicit import Implicit
from metaloss.hypergrad.unrolled import Unrolled
from metaloss.inner import optimizers as O
from metaloss.losses.mlp import ML3Loss

sys.path.insert(0, str(Path(__file__).parent))
from test_hypergrad import OPTS, _flat, _problem, _rel  # noqa: E402

D, N, NV, C = 3, 20, 15, 2.0  # features, train rows, val rows, scale of the regulariser rows


class RidgeLoss(nn.Module):
    """J = L + λR as a per-example loss: targets are (y, is_regulariser_row). The rows
    C·e_j with target 0 and weight λ add λ C² ‖w‖² to the sum: ridge regression, λ = φ."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(lam, dtype=torch.float64))

    def forward(self, pred, target, **ctx):
        sq = (pred.squeeze(-1) - target[..., 0]) ** 2
        return torch.where(target[..., 1] > 0, self.lam * sq, sq)


def _val_mse(pred, target, **ctx):
    return (pred.squeeze(-1) - target[..., 0]) ** 2


def _ridge(lam=0.3, k=400, n_tasks=2, seed=0):
    """T ridge tasks, full-batch inner SGD for K steps from w0 (converged for K >= ~300)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(n_tasks, D, generator=g, dtype=torch.float64)
    x = torch.randn(n_tasks, N, D, generator=g, dtype=torch.float64)
    y = (x @ w_true[..., None]).squeeze(-1) + 0.3 * torch.randn(
        n_tasks, N, generator=g, dtype=torch.float64
    )
    xv = torch.randn(n_tasks, NV, D, generator=g, dtype=torch.float64)
    yv = (xv @ w_true[..., None]).squeeze(-1) + 0.3 * torch.randn(
        n_tasks, NV, generator=g, dtype=torch.float64
    )
    reg_x = C * torch.eye(D, dtype=torch.float64).expand(n_tasks, D, D)
    xa = torch.cat([x, reg_x], 1)
    ta = torch.cat(
        [
            torch.stack([y, torch.zeros_like(y)], -1),
            torch.stack(
                [
                    torch.zeros(n_tasks, D, dtype=torch.float64),
                    torch.ones(n_tasks, D, dtype=torch.float64),
                ],
                -1,
            ),
        ],
        1,
    )
    tv = torch.stack([yv, torch.zeros_like(yv)], -1)
    model = nn.Linear(D, 1, bias=False).double()
    theta0 = {"weight": torch.randn(n_tasks, 1, D, generator=g, dtype=torch.float64)}
    # J = (‖Xw - y‖² + λC²‖w‖²) / M has Hessian 2(XᵀX + λC²I)/M: step 1/λ_max converges fast
    m = N + D
    lmax = torch.linalg.eigvalsh(2 * (x.mT @ x + lam * C**2 * torch.eye(D)) / m).max()
    problem = MetaProblem(model, RidgeLoss(lam), O.sgd(lr=float(1 / lmax)), k, _val_mse)
    batch = MetaBatch(
        theta0, xa[:, None].expand(-1, k, -1, -1), ta[:, None].expand(-1, k, -1, -1), xv, tv
    )
    return problem, batch, (x, y, xv, yv)


def _closed_form(lam, data):
    """dM/dλ of M(λ) = mean_T mean ‖X_v w*(λ) - y_v‖², w* = (XᵀX + λC²I)⁻¹ Xᵀy, by autograd
    through the exact solve."""
    x, y, xv, yv = data
    lam = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    w = torch.linalg.solve(
        x.mT @ x + lam * C**2 * torch.eye(D, dtype=torch.float64), (x.mT @ y[..., None])
    )
    m = ((xv @ w).squeeze(-1) - yv).pow(2).mean()
    (g,) = torch.autograd.grad(m, lam)
    return m.detach(), g


@pytest.mark.parametrize(
    "method",
    [
        Implicit(solver="cg", iterations=10, tolerance=1e-12),
        Implicit(solver="neumann", iterations=500, tolerance=1e-14),
    ],
    ids=["cg", "neumann"],
)
def test_ridge_hypergradient_matches_closed_form(method):
    problem, batch, data = _ridge(lam=0.3)
    meta = meta_params(problem.loss)
    hg = method(problem, meta, batch)
    value, exact = _closed_form(0.3, data)
    torch.testing.assert_close(hg.loss, value, rtol=1e-8, atol=0)
    torch.testing.assert_close(hg.grads["loss.lam"], exact, rtol=1e-6, atol=0)
    assert method.last_iterations >= 1
    if method.solver == "cg":  # D unknowns: CG is exact in at most D steps
        assert method.last_iterations <= D + 1


def test_implicit_agrees_with_a_long_unrolled_run():
    """A strongly convex inner problem run long enough: the unrolled hypergradient tends to
    the implicit one (and the two solvers agree)."""
    problem, batch, _ = _ridge(lam=0.8, k=300, n_tasks=3, seed=1)
    meta = meta_params(problem.loss)
    unrolled = Unrolled()(problem, meta, batch)
    for method in (
        Implicit(solver="cg"),
        Implicit(solver="neumann", iterations=300, tolerance=1e-10),
    ):
        hg = method(problem, meta, batch)
        assert _rel(hg.grads, unrolled.grads) <= 1e-5
        torch.testing.assert_close(hg.loss, unrolled.loss)


def test_neumann_default_alpha_is_inner_lr():
    problem, batch, data = _ridge(lam=0.3)
    hg = Implicit(solver="neumann", iterations=500, tolerance=1e-14)(
        problem, meta_params(problem.loss), batch
    )
    torch.testing.assert_close(hg.grads["loss.lam"], _closed_form(0.3, data)[1], rtol=1e-6, atol=0)


def test_a_learned_inner_lr_is_refused_not_silently_given_zero():
    """A stationary point does not depend on the inner lr: its implicit hypergradient was a
    silent zero, so meta.learn_inner_lr=true did nothing. Refused by the method and, before
    any compute, by the settings check."""
    problem, batch, _ = _ridge(lam=0.3, k=5)
    meta = meta_params(problem.loss, torch.tensor(-2.0, dtype=torch.float64))
    assert LR_KEY in meta
    with pytest.raises(ValueError, match="learn_inner_lr"):
        Implicit(solver="neumann")(problem, meta, batch)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_meta_app_refuses_implicit_with_a_learned_inner_lr(compose_cfg, tmp_path, solver):
    from metaloss.cli import meta as meta_app
    from metaloss.validate import ConfigError

    cfg = compose_cfg(
        "meta",
        APP + ["hypergrad=implicit", f"hypergrad.solver={solver}", "meta.learn_inner_lr=true"],
    )
    with pytest.raises(ConfigError, match=r"meta.learn_inner_lr = true: hypergrad=implicit"):
        meta_app.run(cfg, tmp_path, "ml3")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_diverging_neumann_series_gives_no_estimate_and_names_alpha():
    """α above 2/λ_max: the terms grow. Today's result was a huge finite 'hypergradient';
    now the step has none (NaN: skipped) and the method says alpha is too large."""
    problem, batch, _ = _ridge(lam=0.3, k=50)
    lr = problem.inner_opt.hparams["lr"]  # 1/λ_max of the inner Hessian
    method = Implicit(solver="neumann", iterations=30, alpha=3 * lr)
    hg = method(problem, meta_params(problem.loss), batch)
    assert torch.isfinite(hg.loss) and not torch.isfinite(hg.grads["loss.lam"]).any()
    cause, finding, fix = method.diagnosis()
    advice = f"{finding} {fix}"
    assert (
        cause == "neumann"
        and "hypergrad.alpha" in advice
        and "Lower hypergrad.alpha below" in advice
    )
    lam = float(advice.split("λ ≈ ")[1].split(",")[0])
    torch.testing.assert_close(
        lam, 1 / lr, rtol=0.05, atol=0
    )  # the growing direction's curvature is λ_max
    # a convergent series (alpha = the inner lr) is untouched and leaves no diagnosis
    ok = Implicit(solver="neumann", iterations=30)
    assert torch.isfinite(ok(problem, meta_params(problem.loss), batch).grads["loss.lam"]).all()
    assert ok.diagnosis() is None


def test_negative_curvature_names_damping():
    """A concave direction (λ < 0) makes |1 - αλ| > 1 for every α: raise damping (or use CG)."""
    problem, batch, _ = _ridge(lam=-3.0, k=3)  # λ < 0 makes the regulariser rows concave
    method = Implicit(solver="neumann", iterations=100, alpha=1.0)  # task 0: λ_min ≈ -0.13
    hg = method(problem, meta_params(problem.loss), batch)
    assert not torch.isfinite(hg.grads["loss.lam"]).any()
    cause, finding, fix = method.diagnosis()
    advice = f"{finding} {fix}"
    assert cause == "neumann" and "1 of 2 task(s)" in advice and "<= 0" in advice
    assert "Raise hypergrad.damping above" in advice
    lam = float(advice.split("λ ≈ ")[1].split(" ")[0])
    torch.testing.assert_close(lam, -0.1258, rtol=0.02, atol=0)  # task 0's negative eigenvalue


def test_meta_app_names_the_diverging_neumann_series_not_the_inner_lr(compose_cfg, tmp_path):
    """Before: the run stopped blaming the INNER learning rate (or went on with garbage);
    now it stops naming the Neumann settings, and keeps no complete learned_loss.pt."""
    from metaloss.cli import meta as meta_app
    from metaloss.meta import NonFiniteMetaGradient

    cfg = compose_cfg(
        "meta",
        APP
        + [
            "hypergrad=implicit",
            "hypergrad.solver=neumann",
            "hypergrad.iterations=20",
            "hypergrad.alpha=1000",
            "meta.max_bad_steps=2",
            "meta.steps=4",
        ],
    )
    with pytest.raises(NonFiniteMetaGradient, match="Neumann series.*hypergrad.alpha") as err:
        meta_app.run(cfg, tmp_path, "ml3")
    assert err.value.cause == "neumann" and "INNER" not in str(err.value)
    assert (
        not (tmp_path / "learned_loss.pt").exists()
        and (tmp_path / "learned_loss_last_good.pt").exists()
    )


def test_implicit_on_a_neural_loss_is_finite_and_points_like_unrolled():
    problem, batch = _problem(ML3Loss(hidden=(8,)), O.sgd(lr=0.1), k=6)
    meta = meta_params(problem.loss)
    unrolled = Unrolled()(problem, meta, batch)
    for solver in ("cg", "neumann"):
        hg = Implicit(solver=solver, iterations=5, damping=1.0, alpha=0.1)(problem, meta, batch)
        assert all(torch.isfinite(g).all() for g in hg.grads.values())
        assert set(hg.grads) == set(meta) and torch.isfinite(hg.loss)
        torch.testing.assert_close(hg.loss, unrolled.loss)
        assert _flat(hg.grads).abs().sum() > 0


def test_implicit_rejects_wrong_settings():
    for kw in (
        {"solver": "lbfgs"},
        {"iterations": 0},
        {"alpha": 0.0},
        {"damping": -1.0},
        {"batches": 0},
    ):
        with pytest.raises(ValueError, match="implicit"):
            Implicit(**kw)
    with pytest.raises(ValueError, match="segment"):
        Checkpointed(segment=0)


# ---------------------------------------------------------------- checkpointed unrolling


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("segment", [1, 2, None, 9])
def test_checkpointed_equals_unrolled(opt, segment):
    torch.manual_seed(0)
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS[opt], k=5)
    meta = meta_params(
        problem.loss, torch.tensor(-2.0, dtype=torch.float64)
    )  # learned inner lr too
    plain, ckpt = (
        Unrolled()(problem, meta, batch),
        Checkpointed(segment=segment)(problem, meta, batch),
    )
    assert _rel(ckpt.grads, plain.grads) <= 1e-12
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-14, atol=0)


APP = [
    "logger=none",
    "progress=false",
    "meta.steps=2",
    "meta.tasks_per_step=2",
    "meta.inner_steps=4",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta_test.enabled=false",
    "optim=sgd",
    "optim.lr=0.01",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["hypergrad=implicit", "hypergrad.iterations=3", "hypergrad.damping=0.1"],
        ["hypergrad=implicit", "hypergrad.solver=neumann", "hypergrad.iterations=3"],
        ["hypergrad=checkpointed", "hypergrad.segment=2"],
    ],
)
def test_meta_app_runs_long_horizon_methods(compose_cfg, tmp_path, extra):
    from hydra.utils import instantiate

    from metaloss.cli import meta as meta_app
    from metaloss.losses.io import load_learned_loss

    cfg = compose_cfg("meta", APP + extra)
    before = instantiate(cfg.loss).state_dict()
    meta_app.run(cfg, tmp_path, "ml3")
    after = load_learned_loss(tmp_path / "learned_loss.pt").state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())

"""Every fixed loss refuses the shape mistakes that broadcasting would turn into a wrong
number, names itself and both shapes, accepts the contract's shapes (metaloss.losses.base),
and does the same inside torch.func.vmap (where shapes are per task)."""

import inspect

import pytest
import torch
from torch.func import grad, vmap

from metaloss.losses import fixed as L

B, C, T = 4, 3, 2
LOSSES = {
    name: fn
    for name, fn in inspect.getmembers(L, inspect.isfunction)
    if not name.startswith("_") and hasattr(fn, "kinds")
}
REGRESSION = sorted(n for n, f in LOSSES.items() if "regression" in f.kinds)
CLASSIFICATION = sorted(n for n, f in LOSSES.items() if "classification" in f.kinds)
BINARY = sorted(n for n, f in LOSSES.items() if "binary" in f.kinds)
SEGMENTATION = sorted(n for n, f in LOSSES.items() if "segmentation" in f.kinds)
COUNTS = {
    "weighted_ce",
    "class_balanced_focal",
    "logit_adjusted_ce",
    "balanced_softmax",
}  # need class_counts in the context


def test_every_loss_is_covered():
    assert set(REGRESSION) | set(BINARY) | set(SEGMENTATION) == set(LOSSES)
    assert {"mse", "ce", "bce", "dice"} <= set(LOSSES) and len(LOSSES) == 26


def call(name, pred, target):
    kw = {}
    if name in COUNTS:
        classes = 2 if pred.ndim == 1 or pred.shape[-1] == 1 else pred.shape[-1]
        kw["class_counts"] = torch.arange(1.0, classes + 1)
    if name == "poisson":
        target = target.abs()
    return LOSSES[name](pred, target, **kw)


def refused(name, pred, target):
    with pytest.raises(ValueError, match=rf"^{name}: .*{list(pred.shape)}.*{list(target.shape)}"):
        call(name, pred, target)


def test_the_issue_example():
    with pytest.raises(
        ValueError, match=r"mse: .*same shape.*pred \[4, 1\] and target \[4\].*view_as"
    ):
        L.mse(torch.zeros(4, 1), torch.arange(4.0))


def labels(*shape, classes=C):
    return torch.randint(0, classes, shape)


# ------------------------------------------------------------------ contract shapes accepted


def good_cases(name):
    """(pred, target) pairs the contract allows for this loss."""
    if name in REGRESSION:
        return [
            (torch.randn(B, 2), torch.randn(B, 2)),
            (torch.randn(B, 1), torch.randn(B, 1)),
            (torch.randn(B), torch.randn(B)),
        ]
    if name in SEGMENTATION:
        return [(torch.randn(B, 1, 5, 5), torch.randint(0, 2, (B, 1, 5, 5)).float())]
    binary = [
        (torch.randn(B), labels(B, classes=2)),
        (torch.randn(B, 1), labels(B, classes=2)),
        (torch.randn(B, 1), labels(B, classes=2).float()),
    ]
    if name == "bce":
        return binary + [(torch.randn(B, 1), labels(B, 1, classes=2).float())]
    return binary + [(torch.randn(B, C), labels(B))]


ALL = sorted(LOSSES)


@pytest.mark.parametrize("name", ALL)
def test_contract_shapes_are_accepted(name):
    for pred, target in good_cases(name):
        out = call(name, pred, target)
        assert out.shape == (B,) and torch.isfinite(out).all(), (name, pred.shape, target.shape)


# ------------------------------------------------------------------ broadcasting mistakes refused


@pytest.mark.parametrize("name", REGRESSION)
def test_regression_refuses_broadcasting(name):
    refused(name, torch.zeros(B, 1), torch.arange(float(B)))  # [B, 1] vs [B] -> [B, B]
    refused(name, torch.zeros(B), torch.zeros(B, 1))  # [B] vs [B, 1]
    refused(name, torch.zeros(B, 2), torch.zeros(B, 1))  # D mismatch
    refused(name, torch.zeros(B, 1), torch.zeros(1, 1))  # one target for all
    refused(name, torch.zeros(B, 1), torch.zeros(B + 1, 1))  # batch mismatch
    refused(name, torch.zeros(()), torch.zeros(()))  # no batch dimension


@pytest.mark.parametrize("name", sorted(set(BINARY) - {"bce"}))
def test_classification_refuses_wrong_shapes(name):
    refused(name, torch.zeros(B, C), labels(B, 1))  # [B, 1] labels -> [B, B, C]
    refused(name, torch.zeros(B, C), torch.eye(C)[labels(B)])  # one-hot targets
    refused(name, torch.zeros(B, C), labels(B + 1))  # batch mismatch
    refused(name, torch.zeros(B, C, 2), labels(B))  # 3-D logits
    refused(name, torch.zeros(B, 1), labels(B, 1, classes=2))  # binary needs [B] labels
    with pytest.raises(ValueError, match=rf"^{name}: .*integer class indices"):
        call(name, torch.zeros(B, C), labels(B).float())


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_class_counts_must_match_the_classes(name):
    with pytest.raises(ValueError, match=rf"^{name}: class_counts .*one count per class \({C}"):
        LOSSES[name](torch.zeros(B, C), labels(B), class_counts=[5.0, 5.0])
    with pytest.raises(ValueError, match=rf"^{name}: class_counts .*\(2 for logits \[{B}\]"):
        LOSSES[name](torch.zeros(B), labels(B, classes=2), class_counts=[5.0, 5.0, 5.0])


def test_bce_refuses_wrong_shapes():
    refused("bce", torch.zeros(B, C), labels(B, classes=2))  # not one logit
    refused("bce", torch.zeros(B), labels(B, 1, classes=2))  # [B] vs [B, 1]
    refused("bce", torch.zeros(B, 1), labels(B + 1, classes=2))  # batch mismatch
    refused("bce", torch.zeros(()), labels(classes=2))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_refuses_wrong_shapes(name):
    refused(name, torch.zeros(B, 1, 5, 5), torch.zeros(B, 5, 5))  # mask without channel
    refused(name, torch.zeros(B, 1, 5, 5), torch.zeros(1, 1, 5, 5))  # one mask for all
    refused(name, torch.zeros(B, 1, 5, 5), torch.zeros(B, 1, 5, 4))
    refused(name, torch.zeros(B), torch.zeros(B))  # no pixels


# ------------------------------------------------------------------ the same under vmap


@pytest.mark.parametrize("name", ALL)
def test_under_vmap_per_task_shapes_are_checked(name):
    for pred, target in good_cases(name):
        preds = torch.stack([pred, pred.flip(0)])  # T=2 tasks
        targets = torch.stack([target, target.flip(0)])
        batched = vmap(lambda p, t: call(name, p, t))(preds, targets)
        looped = torch.stack([call(name, p, t) for p, t in zip(preds, targets)])
        torch.testing.assert_close(batched, looped)
        # the same target for every task (in_dims=None) is fine too
        vmap(lambda p, t=target: call(name, p, t))(preds)
    pred, wrong = bad_case(name)
    preds, wrongs = torch.stack([pred] * T), torch.stack([wrong] * T)
    with pytest.raises(ValueError, match=rf"^{name}: .*{list(pred.shape)}.*{list(wrong.shape)}"):
        vmap(lambda p, t: call(name, p, t))(preds, wrongs)


def bad_case(name):
    """A per-task (pred, target) pair that would broadcast silently without the check."""
    if name in REGRESSION:
        return torch.randn(B, 1), torch.randn(B)
    if name in SEGMENTATION:
        return torch.randn(B, 1, 5, 5), torch.zeros(B, 5, 5)
    if name == "bce":
        return torch.randn(B), labels(B, 1, classes=2).float()
    return torch.randn(B, C), labels(B, 1)


def test_gradients_flow_through_the_checks_under_vmap():
    x, y = torch.randn(T, B, 1), torch.randn(T, B, 1)
    g = vmap(grad(lambda w, x, y: L.mse(x * w, y).mean()), in_dims=(None, 0, 0))(
        torch.tensor(0.5), x, y
    )
    expected = torch.stack([(2 * (x[t] * 0.5 - y[t]) * x[t]).mean() for t in range(T)])
    torch.testing.assert_close(g, expected)


# ---------------------------------------------------- the contract, enforced where losses are built
# (issue 15, item 5): a user loss that returns [B, B] or a scalar is refused before the first
# step, naming the loss and both shapes, in metaloss-train (one model and seeds=N under vmap),
# metaloss-meta (the learned loss and the outer objective), the meta-test's baselines
# (compare_losses, plain and vectorised) and metaloss-tune.

USER_LOSSES = """
from metaloss.losses.base import ParametricLoss, fits
import torch


@fits("regression")
def broadcast_mse(pred, target, **_):
    return (pred - target[:, 0]) ** 2          # [B, 1] - [B] -> [B, B]


@fits("regression")
def mean_mse(pred, target, **_):
    return ((pred - target) ** 2).mean()       # reduces itself: a scalar


class BroadcastML3(ParametricLoss):
    kinds = ("regression",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, pred, target, **_):
        return self.w * (pred - target.squeeze(-1)) ** 2
"""


@pytest.fixture
def user_losses(tmp_path, monkeypatch):
    """A module of broken user losses on sys.path and a conf dir naming them (loss=<name>)."""
    import sys

    name = f"userloss_{tmp_path.name[-12:].replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_LOSSES)
    conf = tmp_path / "conf" / "loss"
    conf.mkdir(parents=True)
    for fn in ("broadcast_mse", "mean_mse"):
        (conf / f"{fn}.yaml").write_text(f"_target_: {name}.{fn}\n_partial_: true\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, f"file://{tmp_path / 'conf'}"
    sys.modules.pop(name, None)


def _sine():
    from metaloss.tasks.regression import sine

    return sine(seed=0, n_train=20, n_val=20, n_test=20)


TRAIN = ["task=sine", "logger=none", "progress=false", "train.steps=5"]


@pytest.mark.parametrize(
    "fn,shape,hint",
    [
        ("broadcast_mse", r"\[3, 3\]", "broadcasting bug"),
        ("mean_mse", r"\[\]", "reduced over the batch itself"),
    ],
)
@pytest.mark.parametrize("seeds", [1, 2])  # 2: the vmap path (train_many)
def test_metaloss_train_refuses_a_loss_of_the_wrong_shape(
    compose_cfg, tmp_path, user_losses, fn, shape, hint, seeds
):
    from metaloss.cli import train as train_app
    from metaloss.losses.base import LossContractError

    module, _ = user_losses
    cfg = compose_cfg(
        "train", TRAIN + ["loss=mse", f"loss._target_={module}.{fn}", f"seeds={seeds}"]
    )
    with pytest.raises(
        LossContractError,
        match=rf"loss 'my_loss' returned shape {shape} for a batch of 3 examples "
        rf"of task 'sine' \(pred \[3, 1\], target \[3, 1\]\); expected \[3\].*{hint}",
    ):
        train_app.run(cfg, tmp_path / "run", "my_loss")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_metaloss_meta_refuses_a_learned_loss_and_an_objective_of_the_wrong_shape(
    compose_cfg, tmp_path, user_losses, monkeypatch
):
    from metaloss.cli import meta as meta_app
    from metaloss.losses.base import LossContractError

    module, searchpath = user_losses
    monkeypatch.setattr(
        meta_app, "offline_steps", lambda *a, **k: pytest.fail("meta-training started")
    )
    base = [
        "task=sine",
        "logger=none",
        "progress=false",
        "meta.steps=2",
        "meta.tasks_per_step=2",
        "meta.inner_steps=2",
        "model.hidden=[8]",
    ]
    cfg = compose_cfg("meta", base + ["loss=ml3", f"loss._target_={module}.BroadcastML3"])
    with pytest.raises(LossContractError, match=r"loss 'bcast' returned shape \[3, 3\]"):
        meta_app.run(cfg, tmp_path / "a", "bcast")
    # the outer objective and the compare: baselines come from the run's config sources
    from metaloss.config import baselines_for, loss_option

    task, sp = _sine(), {"hydra": {"searchpath": [searchpath]}}
    with pytest.raises(LossContractError, match=r"loss 'broadcast_mse' returned shape \[3, 3\]"):
        loss_option("broadcast_mse", task, sp)
    with pytest.raises(LossContractError, match=r"loss 'mean_mse' returned shape \[\]"):
        baselines_for(["mse", "mean_mse"], task, sp)


@pytest.mark.parametrize("vectorised", [False, True])
def test_compare_losses_refuses_a_loss_passed_in_directly(user_losses, vectorised):
    import functools
    import importlib

    from metaloss.inner.optimizers import sgd
    from metaloss.losses.base import LossContractError
    from metaloss.losses.fixed import mse
    from metaloss.metatest import compare_losses
    from metaloss.models import mlp

    bad = importlib.import_module(user_losses[0]).broadcast_mse
    task = _sine()
    with pytest.raises(LossContractError, match=r"loss 'oops' returned shape \[3, 3\]"):
        compare_losses(
            lambda seed: [task],
            functools.partial(mlp, hidden=[4]),
            {"mse": mse, "oops": bad},
            functools.partial(torch.optim.SGD, lr=0.01),
            seeds=[0, 1],
            steps=3,
            batch_size=None,
            progress=False,
            vectorised=sgd(lr=0.01) if vectorised else None,
        )


def test_metaloss_tune_refuses_a_baseline_of_the_wrong_shape(tmp_path, user_losses, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from metaloss.cli import tune as tune_app
    from metaloss.config import conf_dir
    from metaloss.losses.base import LossContractError

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "tune",
            [
                "task=sine",
                "logger=none",
                "progress=false",
                "compare=[mse,broadcast_mse]",
                f"hydra.searchpath=[{user_losses[1]}]",
            ],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        with pytest.raises(
            LossContractError, match=r"loss 'broadcast_mse' returned shape \[3, 3\]"
        ):
            tune_app.run(cfg, tmp_path / "tune")
    finally:
        HydraConfig.instance().cfg = None
    assert not (tmp_path / "tune" / "tuned.json").exists()


def test_the_probe_leaves_the_global_rng_alone_and_accepts_every_shipped_loss(compose_cfg):
    """Every built-in loss option passes the probe on a task of its kind, and probing draws
    nothing from torch's global RNG (results stay what they were before the check)."""
    from hydra.utils import instantiate

    from metaloss.config import loss_option, losses_for

    for task_name, kind in [
        ("sine", "regression"),
        ("digits", "classification"),
        ("breast_cancer", "binary"),
    ]:
        task = instantiate(compose_cfg("train", [f"task={task_name}"]).task)
        for name in losses_for(kind):
            if name == "learned":
                continue
            loss_option(name, task)  # the probe runs inside: raises for a loss of the wrong shape
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loss_option("mse", _sine())
    assert torch.equal(torch.rand(3), expected)

"""The vectorised meta-test gives the numbers of the per-model loop (float64), and a loss
that cannot run under vmap falls back to the loop with a warning naming it."""

import functools
import math

import pytest
import torch
from hydra.utils import instantiate

from metaloss.config import loss_option
from metaloss.losses.mlp import ML3Loss
from metaloss.metatest import compare_losses
from metaloss.train_many import CannotStack, train_many


@pytest.fixture
def f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _setup(compose_cfg, task_name, optim, extra=()):
    cfg = compose_cfg("meta", [f"task={task_name}", f"optim={optim}", "model.hidden=[8]", *extra])
    base = instantiate(cfg.task).to("cpu", torch.float64)
    opt = instantiate(cfg.optim)
    make = functools.partial(opt.torch_equivalent.func, **opt.hparams)
    return cfg, base, opt, make


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            for x, y in zip(a[name][k], b[name][k]):
                assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(
                    y, rel=1e-7, abs=1e-9
                ), (name, k, x, y)


@pytest.mark.parametrize("optim", ["sgd", "adam", "momentum"])
def test_vectorised_equals_loop_on_a_task_family(compose_cfg, f64, optim):
    cfg, base, opt, make = _setup(compose_cfg, "sine", optim)

    def tasks_for_seed(seed):
        return [
            instantiate(cfg.task, seed=100 + 10 * seed + i).to("cpu", torch.float64)
            for i in range(3)
        ]

    losses = {
        "learned": ML3Loss(hidden=(8,)).double().requires_grad_(False),
        "mse": loss_option("mse", base),
        "huber": loss_option("huber", base),
    }
    kw = dict(seeds=[0, 1], steps=15, batch_size=32, progress=False)
    loop = compare_losses(tasks_for_seed, instantiate(cfg.model), losses, make, **kw)
    vec = compare_losses(tasks_for_seed, instantiate(cfg.model), losses, make, vectorised=opt, **kw)
    _assert_same(loop, vec)
    assert all(len(v) == 2 for v in vec["learned"].values())


def test_vectorised_equals_loop_on_classification_with_class_counts(compose_cfg, f64):
    cfg, base, opt, make = _setup(compose_cfg, "digits", "sgd", ["optim.lr=0.3"])
    losses = {n: loss_option(n, base) for n in ("ce", "weighted_ce", "focal")}
    kw = dict(seeds=[0, 1, 2], steps=10, batch_size=None, progress=False)
    loop = compare_losses(lambda s: [base], instantiate(cfg.model), losses, make, **kw)
    vec = compare_losses(
        lambda s: [base], instantiate(cfg.model), losses, make, vectorised=opt, **kw
    )
    _assert_same(loop, vec)


def test_a_diverging_member_is_none_and_others_are_untouched(compose_cfg, f64):
    cfg, base, opt, _ = _setup(compose_cfg, "outliers", "sgd", ["optim.lr=0.01"])
    big = instantiate(cfg.task, magnitude=1e200).to("cpu", torch.float64)  # mse overflows to inf
    out = train_many(
        [base, big, base],
        [0, 1, 2],
        instantiate(cfg.model),
        loss_option("mse", base),
        opt,
        steps=5,
        batch_size=16,
    )
    assert out[1] is None and out[0] is not None and out[2] is not None
    alone = train_many(
        [base], [2], instantiate(cfg.model), loss_option("mse", base), opt, steps=5, batch_size=16
    )
    assert alone[0] == out[2]


def test_a_loss_that_cannot_vmap_falls_back_to_the_loop(compose_cfg, caplog):
    cfg, base, opt, make = _setup(compose_cfg, "outliers", "sgd")
    torch.set_default_dtype(torch.float32)
    base = base.to("cpu", torch.float32)

    def python_branch_loss(pred, target, **_):  # data-dependent Python control flow: not vmappable
        r = (pred - target).reshape(len(pred), -1)
        return r.abs().mean(1) if float(r.abs().max()) > 1e9 else (r**2).mean(1)

    python_branch_loss.kinds = frozenset({"regression"})
    losses = {"odd": python_branch_loss, "mse": loss_option("mse", base)}
    kw = dict(seeds=[0, 1], steps=5, batch_size=16, progress=False)
    vec = compare_losses(
        lambda s: [base], instantiate(cfg.model), losses, make, vectorised=opt, **kw
    )
    assert "loss 'odd' cannot be trained under vmap" in caplog.text and "'mse'" not in caplog.text
    loop = compare_losses(lambda s: [base], instantiate(cfg.model), losses, make, **kw)
    assert vec["odd"] == loop["odd"]


def test_full_batches_of_different_sizes_cannot_stack(compose_cfg):
    cfg, base, opt, _ = _setup(compose_cfg, "sine", "sgd")
    other = instantiate(cfg.task, n_train=50)
    with pytest.raises(CannotStack, match="different sizes"):
        train_many(
            [base.to("cpu", torch.float32), other],
            [0, 1],
            instantiate(cfg.model),
            loss_option("mse", other),
            opt,
            steps=2,
            batch_size=None,
        )


def test_minibatches_from_training_splits_of_different_sizes_stack(compose_cfg, f64, caplog):
    """Fresh draws of an imbalanced split differ in size; minibatch training still runs as one
    vmap and gives each member what the per-model loop gives it."""
    cfg, base, opt, make = _setup(
        compose_cfg, "digits", "adam", ["task.imbalance_ratio=5", "+task.imbalance_profile=index"]
    )
    draws = {
        s: instantiate(cfg.task, seed=10000 + 3 * s).to("cpu", torch.float64) for s in range(3)
    }
    assert len({len(t.x_train) for t in draws.values()}) > 1  # the draws really differ in size
    losses = {n: loss_option(n, base) for n in ("ce", "weighted_ce")}
    kw = dict(seeds=[0, 1, 2], steps=12, batch_size=16, progress=False)
    loop = compare_losses(lambda s: [draws[s]], instantiate(cfg.model), losses, make, **kw)
    with caplog.at_level("WARNING", logger="metaloss"):
        vec = compare_losses(
            lambda s: [draws[s]], instantiate(cfg.model), losses, make, vectorised=opt, **kw
        )
    assert "cannot be trained under vmap" not in caplog.text  # one vmap, not the fallback loop
    _assert_same(loop, vec)


def test_train_app_seeds_equals_single_runs_and_report_reads_them(compose_cfg, tmp_path, f64):
    from metaloss.cli import train as train_app
    from metaloss.report import collect

    common = [
        "task=digits",
        "loss=ce",
        "optim=momentum",
        "logger=none",
        "progress=false",
        "train.steps=15",
        "train.batch_size=32",
        "model.hidden=[16]",
        "dtype=float64",
    ]
    mean = train_app.run(
        compose_cfg("train", common + ["seeds=3", "seed=4"]), tmp_path / "many", "ce"
    )
    rec = __import__("json").loads((tmp_path / "many" / "metrics.json").read_text())
    assert [r["seed"] for r in rec["runs"]] == [4, 5, 6]
    singles = []
    for s in (4, 5, 6):
        singles.append(
            train_app.run(compose_cfg("train", common + [f"seed={s}"]), tmp_path / f"s{s}", "ce")
        )
    for r, single in zip(rec["runs"], singles):
        assert r["metrics"]["test/acc"] == pytest.approx(single, abs=1e-12)
    assert mean == pytest.approx(sum(singles) / 3)
    assert collect(tmp_path / "many")["ce"]["test/acc"] == [
        r["metrics"]["test/acc"] for r in rec["runs"]
    ]


def test_train_app_seeds_with_a_diverging_seed_writes_null_and_fails(compose_cfg, tmp_path):
    from metaloss.cli import train as train_app
    from metaloss.train import NonFiniteLoss

    cfg = compose_cfg(
        "train",
        [
            "task=outliers",
            "loss=mse",
            "optim=sgd",
            "optim.lr=100",
            "logger=none",
            "progress=false",
            "train.steps=30",
            "seeds=2",
        ],
    )
    with pytest.raises(NonFiniteLoss, match=r"seed\(s\) \[0, 1\]"):
        train_app.run(cfg, tmp_path, "mse")
    text = (tmp_path / "metrics.json").read_text()
    assert "null" in text and "NaN" not in text

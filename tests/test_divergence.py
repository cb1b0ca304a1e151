"""A run that stops on divergence names the likely cause and keeps its last good φ."""

import pytest
import torch
from hydra.utils import instantiate

from metaloss.cli import meta as meta_app
from metaloss.config import loss_option
from metaloss.hypergrad.base import HyperGrad, MetaProblem
from metaloss.losses.io import load_learned_loss
from metaloss.meta import MetaLearner, NonFiniteMetaGradient
from metaloss.sampling import sample_meta_batch
from metaloss.train import build_model

TINY = [
    "logger=none",
    "progress=false",
    "meta.steps=6",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta.plot_every=100",
    "meta_test.enabled=false",
    "meta.max_bad_steps=2",
]


def test_inner_divergence_is_named_and_the_last_good_loss_is_kept(compose_cfg, tmp_path):
    cfg = compose_cfg("meta", TINY + ["optim.lr=1e30"])  # θ explodes in the first inner step
    with pytest.raises(NonFiniteMetaGradient, match="INNER learning rate.*optim.lr") as err:
        meta_app.run(cfg, tmp_path, "ml3")
    assert err.value.cause == "inner"
    good = load_learned_loss(tmp_path / "learned_loss_last_good.pt")
    assert good.meta["complete"] is False and good.meta["steps"] == 1  # step 1: skipped, not failed
    assert not (tmp_path / "learned_loss.pt").exists()  # never mistaken for a finished run
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


def test_the_last_good_loss_keeps_its_meta_learned_inner_lr(compose_cfg, tmp_path):
    """metaloss-eval tests a kept φ with the inner lr it was learned with, not the default."""
    cfg = compose_cfg("meta", TINY + ["optim.lr=1e30", "meta.learn_inner_lr=true"])
    with pytest.raises(NonFiniteMetaGradient):
        meta_app.run(cfg, tmp_path, "ml3")
    good = load_learned_loss(tmp_path / "learned_loss_last_good.pt")
    assert good.meta["inner_lr"] == pytest.approx(1e30, rel=1e-4)


def test_meta_divergence_is_named(compose_cfg):
    """φ reaches an unstable region after good updates; with the initial φ the same batch
    still trains finitely, so the meta learning rate is blamed."""
    cfg = compose_cfg("meta", TINY)
    task = instantiate(cfg.task)
    factory = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    problem = MetaProblem(
        build_model(factory, task, 0), loss, instantiate(cfg.optim), 2, loss_option("mse", task)
    )
    batch = sample_meta_batch(
        [task],
        factory,
        n_tasks=2,
        inner_steps=2,
        inner_batch=None,
        val_batch=None,
        gen=torch.Generator().manual_seed(0),
    )
    learner = MetaLearner(loss, lambda p: torch.optim.SGD(p, lr=0.01), max_bad_steps=2)
    calls = {"n": 0}

    def hypergrad(problem, meta, batch):
        calls["n"] += 1
        bad = calls["n"] > 2
        fill = float("nan") if bad else 0.1
        return HyperGrad(torch.tensor(fill), {k: torch.full_like(v, fill) for k, v in meta.items()})

    learner.step(problem, hypergrad, batch)
    learner.step(problem, hypergrad, batch)
    learner.step(problem, hypergrad, batch)
    with pytest.raises(NonFiniteMetaGradient, match="META learning rate.*meta_optim.lr") as err:
        learner.step(problem, hypergrad, batch)
    assert err.value.cause == "meta"


def test_a_non_finite_starting_phi_is_refused_not_blamed_on_a_learning_rate():
    """NaN in φ made every step non-finite and the diagnosis blamed the inner lr."""
    from metaloss.cmaes import CMAES
    from metaloss.losses.mlp import ML3Loss

    loss = ML3Loss(hidden=(4,))
    with torch.no_grad():
        loss.net[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\['loss.net.0.weight'\] hold NaN/inf"):
        MetaLearner(loss, lambda p: torch.optim.SGD(p, lr=0.01))
    with pytest.raises(ValueError, match="hold NaN/inf"):
        CMAES(loss)

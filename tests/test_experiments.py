"""Every named experiment composes with its app and instantiates its task, model and loss;
the issue's plain command lines compose too."""

import pytest
from hydra.utils import instantiate

from metaloss.config import baselines_for, group_options, instantiate_loss
from metaloss.losses.base import loss_kinds
from metaloss.train import build_model

TRAIN_EXPERIMENTS = {"mnist1d_cnn", "outliers_baselines", "imbalance_binary"}


def test_every_experiment_is_assigned_to_an_app():
    meta = set(group_options("experiment")) - TRAIN_EXPERIMENTS
    assert {"quickstart", "ml3_sine", "ml3_sine_heldout", "mnist1d_taylorglo", "mnist1d_ml3",
            "imbalance_logit_adjusted"} <= meta


@pytest.mark.parametrize("name", group_options("experiment"))
def test_experiment_composes_and_instantiates(compose_cfg, name):
    app = "train" if name in TRAIN_EXPERIMENTS else "meta"
    cfg = compose_cfg(app, [f"experiment={name}"])
    task = instantiate(cfg.task)
    model = build_model(instantiate(cfg.model), task, 0)
    assert model(task.x_train[:2]).shape[0] == 2
    loss = instantiate_loss(cfg.loss, task)
    assert task.kind in loss_kinds(loss)
    if app == "meta":
        assert baselines_for(cfg.compare, task)
        instantiate(cfg.optim)
        instantiate(cfg.hypergrad)


@pytest.mark.parametrize("overrides", [
    ["task=mnist1d", "model=mlp", "loss=taylorglo", "hypergrad=unrolled", "optim=sgd"],
    ["task=digits", "loss=poly_n", "hypergrad=truncated", "optim=adam"],
    ["task=breast_cancer", "loss=logit_adjusted", "hypergrad=first_order"],
    ["task=outliers", "loss=adaptive_robust", "optim=nadam"],
])
def test_plain_meta_command_lines_compose(compose_cfg, overrides):
    cfg = compose_cfg("meta", overrides)
    task = instantiate(cfg.task)
    loss = instantiate_loss(cfg.loss, task)
    assert task.kind in loss.kinds
    assert set(baselines_for(cfg.compare, task))  # defaults fit the task kind

"""metaloss-train through real Hydra composition, real tasks and real (offline) W&B."""

import json

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from metaloss.cli import train as train_app
from metaloss.config import LossDoesNotFitTask, group_options, instantiate_loss
from metaloss.wandb_offline import read_run

FAST = ["logger=none", "progress=false", "train.steps=30", "train.eval_every=10"]


def test_every_loss_and_optim_config_instantiates(compose_cfg):
    import torch

    task = instantiate(compose_cfg("train", []).task)
    for name in group_options("loss"):
        if name == "learned":  # needs a file: covered in test_meta_app
            continue
        cfg = compose_cfg("train", [f"loss={name}"])
        loss = instantiate_loss(cfg.loss, task)
        if name.startswith("gan_"):  # a GAN loss is a pair of the two players' objectives
            assert callable(loss.discriminator) and callable(loss.generator), name
        else:
            assert callable(loss), name
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in group_options("optim"):
        opt = instantiate(compose_cfg("train", [f"optim={name}"]).optim).torch_equivalent(params)
        assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize(
    "overrides,metric",
    [
        (["task=outliers", "loss=huber"], "test/mse"),
        (["task=digits", "loss=focal", "optim=momentum"], "test/acc"),
        (["task=breast_cancer", "loss=bce", "optim=nadam"], "test/balanced_acc"),
        (
            [
                "task=shapes",
                "model=unet",
                "loss=dice",
                "task.n_train=16",
                "task.n_val=8",
                "task.n_test=8",
                "train.batch_size=8",
            ],
            "test/dice",
        ),
    ],
)
def test_train_runs_and_writes_metrics(compose_cfg, tmp_path, overrides, metric):
    cfg = compose_cfg("train", FAST + overrides)
    loss_name = [o for o in overrides if o.startswith("loss=")][0][5:]
    value = train_app.run(cfg, tmp_path, loss_name)
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["metric"] == metric and rec["metrics"][metric] == pytest.approx(value)
    assert rec["loss"] == loss_name and rec["seed"] == 0
    assert any(k.startswith("val/") for k in rec["metrics"])


def test_binary_metrics_include_minority_recall(compose_cfg, tmp_path):
    cfg = compose_cfg("train", FAST + ["task=breast_cancer", "loss=weighted_ce"])
    train_app.run(cfg, tmp_path, "weighted_ce")
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["test/minority_recall"] <= 1.0


def test_learning_actually_happens(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["logger=none", "progress=false", "train.steps=300"])
    acc = train_app.run(cfg, tmp_path, "ce")
    assert acc > 0.85  # digits MLP, 300 Adam steps; chance is 0.1


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["task=outliers", "loss=dice"], "Losses for regression tasks: "),
        (["task=digits", "loss=mse"], "Losses for classification tasks: "),
        (["task=shapes", "model=unet", "loss=ce"], "Losses for segmentation tasks: "),
        (["task=digits", "loss=bce"], "bce"),
    ],
)
def test_loss_that_does_not_fit_fails_before_training(compose_cfg, tmp_path, overrides, needle):
    cfg = compose_cfg("train", FAST + overrides)
    with pytest.raises(LossDoesNotFitTask, match=needle) as err:
        train_app.run(cfg, tmp_path, overrides[-1][5:])
    assert not (tmp_path / "metrics.json").exists()
    if "regression" in needle:
        assert "mse" in str(err.value) and "huber" in str(err.value)


def test_unknown_loss_name_lists_the_choices(compose_cfg):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg("train", ["loss=not_a_loss"])
    assert "focal" in str(err.value) and "huber" in str(err.value)


def test_wandb_offline_run_is_written_and_readable(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train",
        ["progress=false", "train.steps=40", "train.eval_every=20", "task=outliers", "loss=mae"],
    )
    assert cfg.logger.kind == "wandb" and cfg.logger.mode == "offline"  # the default
    train_app.run(cfg, tmp_path, "mae")
    run = read_run(tmp_path / "wandb")
    assert run["finished"]
    steps = [row["_step"] for row in run["history"] if "val/mse" in row]
    assert steps[:2] == [20, 40]
    assert run["summary"]["test/mse"] == pytest.approx(
        json.loads((tmp_path / "metrics.json").read_text())["metrics"]["test/mse"]
    )
    assert run["config"]["loss"]["_target_"] == "metaloss.losses.fixed.mae"
    assert run["config"]["train"]["steps"] == 40


def test_wandb_run_is_finished_when_training_fails(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train",
        [
            "progress=false",
            "train.steps=5",
            "task=outliers",
            "loss=mse",
            "optim=sgd",
            "optim.lr=1e30",
        ],
    )
    from metaloss.train import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="step"):
        train_app.run(cfg, tmp_path, "mse")
    import wandb

    assert wandb.run is None  # finished in the finally
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))

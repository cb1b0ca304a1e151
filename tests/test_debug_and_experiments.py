"""`debug=default` composes with every app and experiment, and every named experiment runs
end to end through its real app (a few steps) and writes its result files. Elsewhere the
experiments are only composed (tests/test_experiments.py); here they are run."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from test_experiments import TRAIN_EXPERIMENTS

from metaloss.cli import eval as eval_app
from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.config import group_options

EXPERIMENTS = group_options("experiment")


def app_of(name: str) -> str:
    return "train" if name in TRAIN_EXPERIMENTS else "meta"


def assert_tiny(cfg, app: str) -> None:
    assert cfg.logger.kind == "none"
    if app == "train":
        assert cfg.train.steps <= 5 and cfg.train.eval_every <= cfg.train.steps
    else:
        assert cfg.meta.steps <= 2 and cfg.meta.tasks_per_step <= 2 and cfg.meta.inner_steps <= 2
        assert (
            cfg.meta_test.seeds == 2
            and cfg.meta_test.steps <= 5
            and cfg.meta_test.tasks_per_seed == 1
        )


def test_debug_options():
    assert set(group_options("debug")) == {"default", "fast_dev_run"}


@pytest.mark.parametrize("debug", group_options("debug"))
@pytest.mark.parametrize("app", ["train", "meta", "eval"])
def test_debug_composes_for_every_app(compose_cfg, app, debug):
    extra = ["loss_path=x.pt"] if app == "eval" else []
    cfg = compose_cfg(app, [f"debug={debug}"] + extra)
    assert_tiny(cfg, "train" if app == "train" else "meta")
    if debug == "fast_dev_run":
        assert (
            cfg.train.steps == 1
            if app == "train"
            else (cfg.meta.steps, cfg.meta_test.steps) == (1, 1)
        )
    # a group choice on the command line beats the debug file's `override /logger: none`
    assert compose_cfg(app, [f"debug={debug}", "logger=wandb"] + extra).logger.kind == "wandb"
    # without debug= nothing changes
    plain = compose_cfg(app, extra)
    assert plain.logger.kind == "wandb"
    assert (plain.train.steps if app == "train" else plain.meta.steps) > 100


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_debug_shortens_every_experiment(compose_cfg, name):
    app = app_of(name)
    full = compose_cfg(app, [f"experiment={name}"])
    cfg = compose_cfg(app, [f"experiment={name}", "debug=default"])
    assert_tiny(cfg, app)
    # debug changes only how long things run: task, model, loss and optimizers are the
    # experiment's (as written: a warm start's base_params read meta_test.tuned, which debug drops)
    for key in set(full) - {"train", "meta", "meta_test", "logger", "hydra"}:
        assert (
            OmegaConf.to_container(cfg[key], resolve=False)
            == OmegaConf.to_container(full[key], resolve=False)
            if OmegaConf.is_config(cfg[key])
            else cfg[key] == full[key]
        ), key
    if app == "meta":  # and the eval app takes the same experiment
        assert_tiny(
            compose_cfg("eval", [f"experiment={name}", "debug=default", "loss_path=x.pt"]), "meta"
        )


def _run_experiment(compose_cfg, name, out, debug="default"):
    app = app_of(name)
    cfg = compose_cfg(app, [f"experiment={name}", f"debug={debug}", "progress=false"])
    if app == "train":
        loss_name = (
            cfg.loss._target_.rsplit(".", 1)[-1] if cfg.get("loss") else None
        )  # as Hydra's choice
        value = train_app.run(cfg, out, loss_name)
        result = json.loads((out / "metrics.json").read_text())
        assert result["metrics"][result["metric"]] == pytest.approx(value)
        return
    meta_app.run(cfg, out, name)
    assert (out / "learned_loss.pt").stat().st_size > 0
    comp = json.loads((out / "comparison.json").read_text())
    assert "learned" in comp["results"] and len(comp["results"]) > 1
    if cfg.compare:
        assert set(comp["results"]) == {"learned", *cfg.compare}
    assert all(len(per_seed) == 2 for per_seed in comp["results"]["learned"].values())


FAST = {
    "quickstart",
    "ml3_sine",
    "ml3_sine_heldout",
    "outliers_baselines",
}  # sine / outliers: < 5 s


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS]
)
def test_every_experiment_runs_with_debug(compose_cfg, tmp_path, name):
    _run_experiment(compose_cfg, name, tmp_path)


@pytest.mark.parametrize("name", ["quickstart", "outliers_baselines"])
def test_fast_dev_run_runs_both_apps(compose_cfg, tmp_path, name):
    _run_experiment(compose_cfg, name, tmp_path, debug="fast_dev_run")


def test_debug_eval_of_a_learned_loss(compose_cfg, tmp_path):
    meta_app.run(
        compose_cfg(
            "meta",
            ["experiment=quickstart", "debug=default", "progress=false", "meta_test.enabled=false"],
        ),
        tmp_path,
        "ml3",
    )
    (tmp_path / "eval").mkdir()
    out = eval_app.run(
        compose_cfg(
            "eval",
            [
                "experiment=quickstart",
                "debug=default",
                "progress=false",
                f"loss_path={tmp_path / 'learned_loss.pt'}",
            ],
        ),
        tmp_path / "eval",
    )
    assert set(out["results"]) == {"learned", "mse", "mae", "huber"}
    assert torch.isfinite(torch.tensor(out["results"]["learned"]["test/mse"])).all()

"""metaloss-train and metaloss-meta on tasks with loops of their own (GANs, policy gradients),
from config alone: real Hydra composition, the real apps, the docs' add-a-loss recipes as
written, and the refusals of settings such a task does not read."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from metaloss import config
from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.config import LossDoesNotFitTask
from metaloss.errors import ConfigError
from metaloss.gan.losses import FIXED, hinge
from metaloss.gan.train import Budget as GANBudget
from metaloss.gan.train import train_gan
from metaloss.losses.io import load_learned_loss
from metaloss.rl.losses import LearnedPolicyLoss, reinforce
from metaloss.rl.train import Budget as RLBudget
from metaloss.rl.train import train_policy

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "progress=false"]
TINY_GAN = ["task=gan_ring", "task.steps=20", "task.batch=16", "task.hidden=8", "task.samples=64"]
TINY_RL = [
    "task=cartpole",
    "task.updates=3",
    "task.episodes=4",
    "task.max_steps=30",
    "task.eval_episodes=4",
    "task.hidden=8",
]

META_RL = (
    QUIET
    + TINY_RL
    + [
        "loss=learned_policy",
        "optim=adam",
        "optim.lr=0.02",
        "meta_optim=cmaes",
        "meta_optim.popsize=4",
        "meta.steps=2",
        "meta.tasks_per_step=1",
        "meta_test.seeds=2",
    ]
)


@pytest.fixture
def app_cfg():
    """Compose as the apps receive their config (Hydra's node in HydraConfig: the command
    line's overrides and the search path are read from there)."""

    def _app_cfg(config_name: str, overrides: list[str]):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
                cfg = compose(
                    config_name=config_name, overrides=overrides, return_hydra_config=True
                )
        finally:
            GlobalHydra.instance().clear()
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _app_cfg
    HydraConfig.instance().cfg = None


def test_train_from_config_equals_the_python_api(app_cfg, tmp_path):
    """metaloss-train task=gan_ring loss=gan_hinge is train_gan(hinge(), ...) at optim.lr and
    the run's seed, metric for metric."""
    cfg = app_cfg("train", QUIET + TINY_GAN + ["loss=gan_hinge", "optim.lr=0.003", "seed=4"])
    value = train_app.run(cfg, tmp_path, "gan_hinge")
    rec = json.loads((tmp_path / "metrics.json").read_text())
    direct = train_gan(
        hinge(), GANBudget(steps=20, batch=16, hidden=8, samples=64), lr=0.003, seed=4
    )
    assert rec["metric"] == "test/frechet" and rec["loss"] == "gan_hinge" and rec["seed"] == 4
    assert rec["metrics"]["test/frechet"] == pytest.approx(direct["frechet"], rel=1e-9)
    assert rec["metrics"]["val/modes"] == direct["val_modes"]
    assert value == pytest.approx(direct["frechet"], rel=1e-9)


def test_train_seeds_and_the_default_loss(app_cfg, tmp_path):
    """seeds=2 without loss=: the kind's default (reinforce), one entry per seed, each what
    train_policy gives for that seed."""
    cfg = app_cfg("train", QUIET + TINY_RL + ["optim.lr=0.02", "seeds=2", "seed=1"])
    mean = train_app.run(cfg, tmp_path, None)
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["loss"] == "reinforce" and rec["seeds"] == [1, 2]
    budget = RLBudget(updates=3, episodes=4, max_steps=30, eval_episodes=4, hidden=8)
    direct = [train_policy(reinforce, budget, lr=0.02, seed=s)["return"] for s in (1, 2)]
    assert [r["metrics"]["test/return"] for r in rec["runs"]] == pytest.approx(direct)
    assert mean == pytest.approx(sum(direct) / 2)


def test_meta_searches_saves_and_meta_tests(app_cfg, tmp_path):
    """metaloss-meta on cartpole: CMA-ES moves the learned loss away from REINFORCE, the saved
    file is that loss, and the meta-test's learned row is what training with the file gives."""
    cfg = app_cfg("meta", META_RL + ["meta_optim.sigma0=0.5"])
    out = meta_app.run(cfg, tmp_path, "learned_policy")
    history = json.loads((tmp_path / "search.json").read_text())["history"]
    assert [row["generation"] for row in history] == [1, 2] and out["history"] == history
    loss = load_learned_loss(tmp_path / "learned_loss.pt")
    assert isinstance(loss, LearnedPolicyLoss)
    assert any(p.abs().sum() > 0 for p in loss.net[2].parameters())  # no longer REINFORCE
    comp = json.loads((tmp_path / "comparison.json").read_text())
    assert set(comp["results"]) == {"learned", "reinforce"}
    budget = RLBudget(updates=3, episodes=4, max_steps=30, eval_episodes=4, hidden=8)
    again = [train_policy(loss, budget, lr=0.02, seed=s)["return"] for s in (0, 1)]
    assert comp["results"]["learned"]["test/return"] == pytest.approx(again)
    assert comp["significance"]["best_baseline"] == "reinforce"
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "comparison.md").is_file()


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (TINY_GAN + ["loss=gan_hinge", "optim=sgd"], ConfigError, "optim=adam"),
        (TINY_GAN + ["loss=gan_hinge", "model.hidden=[4]"], ConfigError, "does not read"),
        (TINY_GAN + ["loss=gan_hinge", "train.steps=3"], ConfigError, "task.\\*"),
        (TINY_GAN + ["loss=ce"], LossDoesNotFitTask, "Losses for gan tasks: .*gan_hinge"),
        (["task=digits", "loss=gan_hinge"], LossDoesNotFitTask, "fits \\['gan'\\]"),
        (TINY_RL + ["loss=reinforce", "optim.lr=-1"], ConfigError, "optim.lr"),
    ],
)
def test_train_refuses_what_the_task_cannot_do(app_cfg, tmp_path, overrides, error, match):
    cfg = app_cfg("train", QUIET + overrides)
    with pytest.raises(error, match=match):
        train_app.run(cfg, tmp_path, None)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["loss=learned_policy", "optim=adam"], "meta_optim=cmaes"),  # the default: adam
        (["loss=reinforce", "optim=adam", "meta_optim=cmaes"], "parametric loss"),
        (["loss=learned_policy", "meta_optim=cmaes"], "optim=adam"),  # meta's default: sgd
        (
            ["loss=learned_policy", "optim=adam", "meta_optim=cmaes", "meta_optim.objective=error"],
            "does not read meta_optim.objective=error",
        ),
        (
            ["loss=learned_policy", "optim=adam", "meta_optim=cmaes", "hypergrad=es"],
            "does not read hypergrad",
        ),
        (
            ["loss=learned_policy", "optim=adam", "meta_optim=cmaes", "compare=[ce]"],
            "fits \\['binary', 'classification'\\]",
        ),
    ],
)
def test_meta_refuses_before_any_search(app_cfg, tmp_path, overrides, match):
    cfg = app_cfg("meta", QUIET + TINY_RL + overrides)
    with pytest.raises(ValueError, match=match):
        meta_app.run(cfg, tmp_path, overrides[0][5:])
    assert not (tmp_path / "search.json").exists()


def _doc_block(doc: str, name: str) -> str:
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S)
    found = [b for b in blocks if b.split("\n", 1)[0].split()[1:2] == [name]]
    assert len(found) == 1, f"docs/{doc} has {len(found)} blocks for {name}"
    return found[0]


@pytest.mark.parametrize(
    "doc,module,yaml,task,metric",
    [
        ("gan.md", "my_gan_losses.py", "my_conf/loss/hinge_ns.yaml", TINY_GAN, "test/frechet"),
        (
            "rl.md",
            "my_policy_losses.py",
            "my_conf/loss/clipped_reinforce.yaml",
            TINY_RL,
            "test/return",
        ),
    ],
)
def test_a_user_loss_is_one_function_and_one_yaml(
    app_cfg, tmp_path, monkeypatch, doc, module, yaml, task, metric
):
    """The guides' recipes as written, from outside the package: the user's loss trains from
    config and is listed among the kind's losses."""
    for rel in (module, yaml):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(_doc_block(doc, rel)))
    monkeypatch.syspath_prepend(str(tmp_path))
    name = Path(yaml).stem
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    cfg = app_cfg("train", QUIET + task + [search, f"loss={name}", "optim.lr=0.01"])
    value = train_app.run(cfg, tmp_path / "run", name)
    assert math.isfinite(value)
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["loss"] == name and rec["metrics"][metric] == value
    kind = "gan" if doc == "gan.md" else "policy"
    assert name in config.losses_for(kind, cfg)


@pytest.mark.slow  # two console scripts in subprocesses
def test_the_console_scripts_with_debug_run_in_seconds(tmp_path):
    """debug=default shrinks a task with a loop of its own (whose budget the debug config's
    engine settings do not reach), and a refused setting exits 2 naming it."""
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [
            str(bin_dir / "metaloss-meta"),
            "debug=default",
            "task=gan_ring",
            "loss=learned_gan",
            "optim=adam",
            "meta_optim=cmaes",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'meta'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    comp = json.loads((tmp_path / "meta" / "comparison.json").read_text())
    assert set(comp["results"]) == {"learned", *config.DEFAULT_BASELINES["gan"]}
    assert all(len(v) == 2 for v in comp["results"]["learned"].values())  # debug: 2 seeds
    refused = subprocess.run(
        [
            str(bin_dir / "metaloss-train"),
            "task=cartpole",
            "train.steps=3",
            f"hydra.run.dir={tmp_path / 'train'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "does not read train.steps=3" in refused.stderr


def test_gan_mnist1d_from_config(app_cfg, tmp_path):
    """task=gan_mnist1d is the GAN task on MNIST-1D signals, measured on the classifier's
    features (metaloss.gan.mnist1d)."""
    tiny = ["task=gan_mnist1d", "task.steps=3", "task.batch=16", "task.hidden=8", "task.samples=64"]
    cfg = app_cfg("train", QUIET + tiny + ["loss=gan_least_squares"])
    train_app.run(cfg, tmp_path, "gan_least_squares")
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["task"] == "gan_mnist1d" and 0 <= rec["metrics"]["test/modes"] <= 10
    direct = train_gan(
        FIXED["least_squares"],
        GANBudget(steps=3, batch=16, hidden=8, samples=64, data="mnist1d"),
        lr=1e-3,
        seed=0,
    )
    assert rec["metrics"]["test/frechet"] == pytest.approx(direct["frechet"], rel=1e-9)


@pytest.mark.parametrize(
    "app,extra,match",
    [
        ("meta", ["meta.checkpoint_every=1"], "does not read meta.checkpoint_every=1"),
        ("meta", ["meta_test.fresh_draws=false"], "does not read meta_test.fresh_draws"),
        ("meta", ["meta_optim.chunk=2"], "does not read meta_optim.chunk"),
        ("meta", ["meta_test.metric=test/frechet"], "meta_test.metric = 'test/frechet': one of"),
        ("train", ["optim.betas=[0.1,0.2]"], "does not read optim.betas"),
        ("train", ["task.updates=true"], "task.updates = True: must be an integer >= 1"),
        ("train", ["task.episodes=1"], "task.episodes = 1: must be an integer >= 2"),
    ],
)
def test_what_the_loop_would_not_read_or_cannot_use_is_refused(
    app_cfg, tmp_path, app, extra, match
):
    base = META_RL if app == "meta" else QUIET + TINY_RL
    cfg = app_cfg(app, base + extra)
    # a task's own check reaches here inside Hydra's InstantiationException (the console
    # prints its message and exits 2, as for every task)
    with pytest.raises(Exception, match=re.escape(match)):
        (meta_app if app == "meta" else train_app).run(cfg, tmp_path, None)
    assert not list(tmp_path.glob("*.json")) or not (tmp_path / "search.json").exists()


def test_a_search_that_diverges_everywhere_fails_and_saves_no_loss(app_cfg, tmp_path):
    """At optim.lr = 1e20 every candidate diverges: the run stops with an error (exit 1 at the
    console) instead of saving the unchanged start as a finished learned loss."""
    from metaloss.train import NonFiniteLoss

    rl_only = ("task", "loss=", "optim.lr")
    cfg = app_cfg(
        "meta",
        [o for o in META_RL if not o.startswith(rl_only)]
        + TINY_GAN
        + ["loss=learned_gan", "optim.lr=1e20"],
    )
    with pytest.raises(NonFiniteLoss, match="every candidate of every generation diverged"):
        meta_app.run(cfg, tmp_path, "learned_gan")
    history = json.loads((tmp_path / "search.json").read_text())["history"]
    assert len(history) == 2 and all(r["best_frechet"] is None for r in history)  # NaN: null
    assert not (tmp_path / "learned_loss.pt").exists()


def test_a_finished_search_is_not_silently_redone(app_cfg, tmp_path):
    cfg = app_cfg("meta", META_RL + ["meta_test.enabled=false"])
    meta_app.run(cfg, tmp_path, "learned_policy")
    again = app_cfg("meta", META_RL + ["meta_test.enabled=false", "meta.steps=3"])
    with pytest.raises(ConfigError, match="holds a finished search"):
        meta_app.run(again, tmp_path, "learned_policy")


def test_a_policy_loss_must_give_one_value_per_step():
    from metaloss.losses.base import LossContractError

    budget = RLBudget(updates=1, episodes=2, max_steps=10, eval_episodes=2, hidden=4)
    with pytest.raises(LossContractError, match="one value per step"):
        train_policy(lambda logp, adv, t: (-logp * adv).mean(), budget, lr=0.01, seed=0)


def test_tune_and_eval_refuse_these_tasks(app_cfg, tmp_path):
    from metaloss.cli import eval as eval_app
    from metaloss.cli import tune as tune_app

    with pytest.raises(ConfigError, match="metaloss-tune runs the engine's training loop"):
        tune_app.run(app_cfg("tune", QUIET + TINY_RL), tmp_path / "tune")
    cfg = app_cfg("meta", META_RL + ["meta_test.enabled=false"])
    meta_app.run(cfg, tmp_path / "meta", "learned_policy")
    cfg = app_cfg("eval", QUIET + [f"loss_path={tmp_path / 'meta' / 'learned_loss.pt'}"])
    with pytest.raises(ConfigError, match="loss=learned loss.path="):
        eval_app.run(cfg, tmp_path / "eval", set())


def test_debug_keeps_the_task_settings_given(app_cfg, tmp_path):
    """debug=default shrinks the task, but a task.<key> on the command line stays (as it beats
    the debug config for any other task)."""
    cfg = app_cfg("train", QUIET + ["task=cartpole", "debug=default", "task.updates=3"])
    train_app.run(cfg, tmp_path, "reinforce")
    got = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["test/return"]
    small = RLBudget(updates=3, episodes=2, max_steps=20, eval_episodes=2, hidden=4)
    assert got == train_policy(reinforce, small, lr=1e-3, seed=0)["return"]


def test_a_loss_that_declares_no_kind_is_a_setting_error(app_cfg, tmp_path, monkeypatch):
    """A user's policy loss without @fits is refused with the fix named (exit 2 at the
    console), not a traceback."""
    (tmp_path / "undeclared.py").write_text("def pg(logp, adv, t, **_):\n    return -logp * adv\n")
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "pg.yaml").write_text(
        "_target_: undeclared.pg\n_partial_: true\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = app_cfg("train", QUIET + TINY_RL + [search, "loss=pg"])
    with pytest.raises(LossDoesNotFitTask, match="decorate a function with"):
        train_app.run(cfg, tmp_path / "run", "pg")

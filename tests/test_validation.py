"""Every setting is checked for type and range before any data is made or any step taken."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaloss.cli import eval as eval_app
from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.config import group_options
from metaloss.meta import MetaLearner
from metaloss.train import BatchSampler
from metaloss.validate import ConfigError, problems

BIN = Path(sys.executable).parent
TRAIN_EXPERIMENTS = {"mnist1d_cnn", "outliers_baselines", "imbalance_binary"}

META_BAD = [
    ("meta.steps=0", "meta.steps = 0: must be an integer >= 1"),
    ("meta.steps=abc", "meta.steps = 'abc'"),
    ("meta.steps=2.5", "meta.steps = 2.5"),
    ("meta.tasks_per_step=0", "meta.tasks_per_step"),
    ("meta.inner_steps=-1", "meta.inner_steps"),
    ("meta.inner_batch=-4", "meta.inner_batch = -4: must be an integer >= 1 or null"),
    ("meta.val_batch=0", "meta.val_batch"),
    ("meta.train_tasks=0", "meta.train_tasks"),
    ("meta.clip_grad_norm=-1", "meta.clip_grad_norm = -1: must be a number > 0 or null"),
    ("meta.checkpoint_every=0", "meta.checkpoint_every"),
    ("meta.plot_every=0", "meta.plot_every"),
    ("meta.online_update_every=0", "meta.online_update_every"),
    ("meta.max_bad_steps=0", "meta.max_bad_steps"),
    ("meta.mode=sideways", "meta.mode = 'sideways': must be one of offline, online"),
    ("meta.objective=nope", "meta.objective = 'nope': must be a loss from conf/loss"),
    ("meta.learn_inner_lr=maybe", "meta.learn_inner_lr"),
    ("meta_test.seeds=0", "meta_test.seeds"),
    ("meta_test.steps=0", "meta_test.steps"),
    ("meta_test.batch_size=-4", "meta_test.batch_size = -4"),
    ("meta_test.tasks_per_seed=0", "meta_test.tasks_per_seed"),
    ("meta_test.alpha=1.5", "meta_test.alpha = 1.5: must be a number in (0, 1)"),
    ("meta_test.metric=test/nope", "meta_test.metric = 'test/nope'"),
    ("meta_test.lr=-1", "meta_test.lr"),
    ("+meta_test.task_overrides.amplitude=[5.0,1.0]", "meta_test.task_overrides.amplitude"),
    ("compare=[mse,nope]", "compare = ['mse', 'nope']"),
    ("optim.lr=0", "optim.lr = 0: must be a number > 0"),
    ("meta_optim.lr=-0.1", "meta_optim.lr"),
    ("optim=adam optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim=momentum optim.momentum=1.2", "optim.momentum"),
    ("hypergrad=truncated hypergrad.k=6", "hypergrad.k = 6: must be <= meta.inner_steps (5)"),
    ("hypergrad=es hypergrad.sigma=0", "hypergrad.sigma"),
    ("hypergrad=es hypergrad.population=0", "hypergrad.population"),
    ("hypergrad=es hypergrad.objective=accuracy", "hypergrad.objective"),
    ("seed=-1", "seed = -1"),
    ("task.n_train=0", "task.n_train"),
    ("task.x_range=[2.0,-2.0]", "task.x_range"),
    ("model.hidden=[0]", "model.hidden = [0]"),
    ("loss.hidden=[-1]", "loss.hidden = [-1]"),
    ("loss=taylorglo loss.init=cubic", "loss.init = 'cubic'"),
    (
        "task=mnist1d loss=logit_adjusted task.imbalance_ratio=0.5",
        "task.imbalance_ratio = 0.5: must be a number >= 1",
    ),
    ("task=digits loss=logit_adjusted task.label_noise.rate=1.5", "task.label_noise.rate"),
    ("task=digits loss=logit_adjusted task.label_noise.kind=random", "task.label_noise.kind"),
    ("task=mnist1d loss=logit_adjusted task.positive_classes=[12]", "task.positive_classes"),
    (
        "model=convnet model.channels=30 model.groups=4",
        "model.groups = 4: must divide model.channels",
    ),
    ("logger.mode=sometimes", "logger.mode"),
    (
        "model.hidden=[100000000]",
        "model.hidden = [100000000]: must be a list of integers in [1, 1000000]",
    ),
    ("loss.hidden=[100000000]", "loss.hidden"),
    (
        "task=digits loss=poly_n loss.degree=100000000",
        "loss.degree = 100000000: must be an integer in [1, 64]",
    ),
    ("hypergrad=es hypergrad.population=10000000", "hypergrad.population"),
    ("task=digits loss=taylorglo loss.center_target=nan", "loss.center_target = nan"),
    ("task=digits loss=poly_n loss.init_epsilon=nan", "loss.init_epsilon"),
    ("compare=[learned]", "compare = ['learned']"),
    ("meta.objective=learned", "meta.objective = 'learned'"),
    ("logger.tags=abc", "logger.tags = 'abc': must be a list of strings"),
    ("+inner_optim=adam", "inner_optim: renamed to optim"),
    ("+inner_optim.lr=0.5", "inner_optim: renamed to optim"),
    ("+foo=1", "foo: not a metaloss setting"),
    (
        "task=mnist1d loss=logit_adjusted task.positive_classes=[0,0]",
        "task.positive_classes = [0, 0]",
    ),
    (
        "task=mnist1d loss=logit_adjusted task.positive_classes=[0,1,2,3,4,5,6,7,8,9]",
        "leave at least one digit",
    ),
]
TRAIN_BAD = [
    ("train.batch_size=-4", "train.batch_size = -4: must be an integer >= 1 or null"),
    ("train.steps=0", "train.steps"),
    ("train.eval_every=-1", "train.eval_every"),
    ("optim.lr=0", "optim.lr"),
    ("loss=focal loss.gamma=-1", "loss.gamma = -1: must be a number >= 0"),
    ("loss=label_smoothing loss.epsilon=1.5", "loss.epsilon = 1.5: must be a number in [0, 1)"),
    ("loss=poly1 loss.epsilon=-3", "loss.epsilon = -3"),
    ("loss=gce loss.q=0", "loss.q = 0"),
    ("task=outliers loss=huber loss.delta=0", "loss.delta = 0: must be a number > 0"),
    ("task=outliers loss=quantile loss.tau=1.0", "loss.tau"),
    ("metric=acc", "metric = 'acc': must be null or <split>/<metric>"),
    ("task.val_frac=0.6 task.test_frac=0.5", "task.val_frac + task.test_frac"),
]


def _no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data or training started before the settings were checked")

    monkeypatch.setattr(meta_app, "task_pool", boom)
    monkeypatch.setattr(meta_app, "instantiate", boom)
    monkeypatch.setattr(train_app, "instantiate", boom)


@pytest.mark.parametrize("override,message", META_BAD)
def test_meta_settings_are_refused_before_any_compute(
    compose_cfg, tmp_path, monkeypatch, override, message
):
    cfg = compose_cfg("meta", ([] if "logger" in override else ["logger=none"]) + override.split())
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError) as err:
        meta_app.run(cfg, tmp_path, "ml3")
    assert message in str(err.value)
    assert not (tmp_path / "run.json").exists()  # a refused run claims nothing


@pytest.mark.parametrize("override,message", TRAIN_BAD)
def test_train_settings_are_refused_before_any_compute(
    compose_cfg, tmp_path, monkeypatch, override, message
):
    cfg = compose_cfg("train", ["logger=none", *override.split()])
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError) as err:
        train_app.run(cfg, tmp_path, "x")
    assert message in str(err.value)


def test_every_problem_is_listed_at_once(compose_cfg):
    found = problems(
        compose_cfg("meta", ["meta.steps=0", "meta_test.alpha=2", "meta.clip_grad_norm=-1"])
    )
    assert len(found) == 3


def test_eval_refuses_a_missing_loss_file(compose_cfg, tmp_path):
    cfg = compose_cfg("eval", ["logger=none", f"loss_path={tmp_path / 'nope.pt'}"])
    with pytest.raises(ConfigError, match="loss_path = .*nope.pt.*existing file"):
        eval_app.run(cfg, tmp_path / "out")


def test_metric_of_another_task_kind_is_refused_before_training(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(train_app, "train_model", lambda *a, **k: pytest.fail("trained"))
    cfg = compose_cfg("train", ["logger=none", "task=outliers", "loss=mse", "metric=test/acc"])
    with pytest.raises(ConfigError, match="metric = 'test/acc': must be one of .*test/mse"):
        train_app.run(cfg, tmp_path, "mse")
    mcfg = compose_cfg("meta", ["logger=none", "meta_test.metric=test/acc"])
    monkeypatch.setattr(meta_app, "offline_steps", lambda *a, **k: pytest.fail("meta-trained"))
    with pytest.raises(ConfigError, match="meta_test.metric = 'test/acc': must be one of test/mse"):
        meta_app.run(mcfg, tmp_path / "m", "ml3")


def test_a_setting_the_chosen_component_does_not_take_is_refused(
    compose_cfg, tmp_path, monkeypatch
):
    """mnist1d_ml3 sets meta_optim.lr (Adam) and loss.fit_to (ML3): switching to CMA-ES and
    TaylorGLO kept both, and the run died in a TypeError traceback at construction."""
    cfg = compose_cfg(
        "meta", ["logger=none", "experiment=mnist1d_ml3", "meta_optim=cmaes", "loss=taylorglo"]
    )
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError) as err:
        meta_app.run(cfg, tmp_path, "taylorglo")
    assert "meta_optim.lr: not a setting of meta_optim (metaloss.cmaes.CMAES)" in str(err.value)
    assert "loss.fit_to: not a setting of loss" in str(err.value) and "~loss.fit_to" in str(
        err.value
    )
    assert (
        problems(
            compose_cfg(
                "meta",
                [
                    "experiment=mnist1d_ml3",
                    "meta_optim=cmaes",
                    "~meta_optim.lr",
                    "loss=taylorglo",
                    "~loss.fit_to",
                ],
            )
        )
        == []
    )
    assert any("task.n_trian" in p for p in problems(compose_cfg("meta", ["+task.n_trian=5"])))


@pytest.mark.parametrize("name", group_options("experiment"))
def test_every_shipped_experiment_is_valid(compose_cfg, name):
    app = "train" if name in TRAIN_EXPERIMENTS else "meta"
    assert problems(compose_cfg(app, [f"experiment={name}"])) == []


@pytest.mark.parametrize(
    "group", ["task", "model", "loss", "optim", "meta_optim", "hypergrad", "optim"]
)
def test_every_shipped_option_is_valid(compose_cfg, group):
    app = "train" if group == "optim" else "meta"
    for option in group_options(group):
        if option == "learned":  # needs a file: covered by its own tests
            continue
        extra = ["loss=symbolic"] if (group, option) == ("meta_optim", "gp") else []  # needs it
        assert problems(compose_cfg(app, [f"{group}={option}", *extra])) == [], option


@pytest.mark.slow
def test_negative_batch_size_exits_at_once_instead_of_hanging(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        [BIN / "metaloss-train", "train.batch_size=-4", "logger=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "train.batch_size = -4: must be an integer >= 1 or null" in proc.stdout + proc.stderr
    assert time.time() - t0 < 60


def test_library_guards_refuse_what_would_hang_or_ascend():
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(10, -4, torch.Generator())
    with pytest.raises(ValueError, match="clip_grad_norm"):
        MetaLearner(torch.nn.Linear(1, 1), lambda p: torch.optim.SGD(p, lr=0.1), clip_grad_norm=-1)


def test_batch_sampler_matches_epochs_of_permutations():
    gen = torch.Generator().manual_seed(0)
    s = BatchSampler(10, 4, gen)
    first = [next(s) for _ in range(4)]  # 2 batches per epoch (the last 2 examples dropped)
    ref = torch.Generator().manual_seed(0)
    p1, p2 = torch.randperm(10, generator=ref), torch.randperm(10, generator=ref)
    expect = [p1[:4], p1[4:8], p2[:4], p2[4:8]]
    assert all(torch.equal(a, b) for a, b in zip(first, expect))


@pytest.mark.parametrize(
    "app,overrides,message",
    [
        (
            "train",
            ["task=shapes", "model=mlp", "loss=dice"],
            "model: mlp does not fit segmentation task 'shapes'",
        ),
        (
            "train",
            ["task=digits", "model=unet", "loss=ce"],
            "model: unet does not fit classification task 'digits'",
        ),
        (
            "train",
            ["task=mnist1d", "model=cnn1d", "model.kernel=1000"],
            "kernel (1000) is longer than the input",
        ),
        (
            "train",
            ["task=mnist1d", "model.hidden=[900000,900000]"],
            "parameters for task 'mnist1d'; the limit",
        ),
        (
            "meta",
            [
                "task=outliers",
                "meta_test.fresh_draws=false",
                "+meta_test.task_overrides.fraction=0.9",
            ],
            "only fresh test draws",
        ),
        (
            "meta",
            ["task=digits", "loss=logit_adjusted", "loss.num_classes=3"],
            "loss.num_classes = 3: must be 10",
        ),
    ],
)
def test_settings_that_do_not_fit_the_task_are_refused_before_training(
    compose_cfg, tmp_path, monkeypatch, app, overrides, message
):
    monkeypatch.setattr(train_app, "train_model", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(meta_app, "offline_steps", lambda *a, **k: pytest.fail("meta-trained"))
    cfg = compose_cfg(app, ["logger=none", "progress=false", *overrides])
    with pytest.raises(ConfigError) as err:
        (train_app if app == "train" else meta_app).run(cfg, tmp_path, "x")
    assert message in str(err.value)


def test_a_frozen_learned_loss_is_not_meta_trained(compose_cfg, tmp_path):
    from metaloss.losses.io import save_learned_loss
    from metaloss.losses.mlp import ML3Loss

    save_learned_loss(ML3Loss(hidden=(8,)), tmp_path / "l.pt")
    cfg = compose_cfg("meta", ["logger=none", "loss=learned", f"loss.path={tmp_path / 'l.pt'}"])
    with pytest.raises(ConfigError, match="loss.frozen = true cannot be meta-trained"):
        meta_app.run(cfg, tmp_path / "run", "learned")
    with pytest.raises(ConfigError, match="loss.path = .*must be an existing file"):
        meta_app.run(
            compose_cfg("meta", ["logger=none", "loss=learned", f"loss.path={tmp_path}"]),
            tmp_path / "r2",
            "learned",
        )


def test_meta_test_metric_is_checked_against_what_the_meta_test_records(
    compose_cfg, tmp_path, monkeypatch
):
    """`train/mse` is no meta-test record (it used to pass, then fail after meta-training)."""
    from hydra.utils import instantiate as inst

    from metaloss.validate import check_against_task

    task = inst(compose_cfg("meta", []).task)
    check_against_task(compose_cfg("meta", ["meta_test.metric=train/loss", "logger=none"]), task)
    monkeypatch.setattr(meta_app, "offline_steps", lambda *a, **k: pytest.fail("meta-trained"))
    with pytest.raises(ConfigError, match="meta_test.metric = 'train/mse'"):
        meta_app.run(
            compose_cfg("meta", ["logger=none", "meta_test.metric=train/mse"]), tmp_path, "ml3"
        )


@pytest.mark.parametrize("value", ["5", "[a,b]"])
def test_a_resume_from_that_is_not_a_path_is_refused_as_a_setting(compose_cfg, tmp_path, value):
    """The settings are checked before anything reads them as a path (no TypeError)."""
    cfg = compose_cfg("meta", ["logger=none", f"meta.resume_from={value}"])
    with pytest.raises(ConfigError, match="meta.resume_from"):
        meta_app.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


def test_tune_learned_lr_needs_a_tuned_file_except_in_the_tune_app_that_writes_it(compose_cfg):
    """metaloss-tune runs with meta_test.tuned=null (it writes the file): an experiment whose
    meta-test tunes the learned loss's lr must still be tunable (scripts/record_experiment.py
    once failed on exactly this), while metaloss-meta refuses the same settings."""
    overrides = [
        "experiment=metric_mnist1d",
        "meta_test.tuned=null",
        "meta_test.tune_learned_lr=true",
    ]
    meta_problems = problems(compose_cfg("meta", overrides))
    assert any("tune_learned_lr = true needs meta_test.tuned" in p for p in meta_problems)
    assert problems(compose_cfg("tune", overrides), "tune") == []

"""metaloss-tune: tuned baselines on the validation split (Optuna), budget accounting, and the
meta-test taking tuned.json (per-loss learning rates, recorded in comparison.json)."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import metaloss.tune
from metaloss.cli import tune as tune_app
from metaloss.cli.comparison import run_meta_test
from metaloss.cli.logger import NullLogger
from metaloss.losses.fixed import ce
from metaloss.runtime import task_pool
from metaloss.tune import (
    SEARCH_SPACES,
    Range,
    TunedFileError,
    load_tuned,
    meta_training_steps,
    trials_for_budget,
    tune_loss,
    tuned_for,
)
from metaloss.validate import LOSS_RULES, ConfigError, check_config

# digits, a 16-unit MLP, plain SGD: a trial is 30 full-batch-free steps on 1-2 seeds (well under a
# second)
TINY = [
    "task=digits",
    "model.hidden=[16]",
    "optim=sgd",
    "logger=none",
    "progress=false",
    "meta_test.steps=30",
    "meta_test.batch_size=64",
    "tune.seeds=1",
]


def _tune(compose_cfg, out, overrides, base=TINY):
    cfg = compose_cfg("tune", base + overrides)
    return cfg, tune_app.run(cfg, out)


def test_every_search_range_lies_inside_the_loss_rules():
    for loss, space in SEARCH_SPACES.items():
        for key, r in space.items():
            assert r.low < r.high and (not r.log or r.low > 0), (loss, key)
            for v in (r.low, r.high):
                assert LOSS_RULES[loss][key](v) is None, (loss, key, v)


def test_tune_loss_finds_a_known_optimum_reproducibly_and_counts_divergence():
    def score(p, lr):  # optimum at gamma = 1.3; lr > 0.3 "diverges"
        return math.nan if lr > 0.3 else -((p["gamma"] - 1.3) ** 2) - (math.log10(lr) + 2) ** 2

    kw = dict(
        lr=0.001, lr_space=Range(1e-4, 1.0, log=True), n_trials=30, direction="maximize", seed=3
    )
    a = tune_loss(score, {"gamma": Range(0.0, 5.0)}, {"gamma": 2.0}, **kw)
    b = tune_loss(score, {"gamma": Range(0.0, 5.0)}, {"gamma": 2.0}, **kw)
    assert a.trials == b.trials and a.params == b.params  # seeded TPE: the same trials
    assert (
        a.trials[0]["params"] == {"gamma": 2.0} and a.trials[0]["lr"] == 0.001
    )  # trial 0 = the default
    assert abs(a.params["gamma"] - 1.3) < 0.5 and 0.002 < a.lr < 0.05
    assert a.best_val > a.default_val and a.n_trials == 30
    assert a.n_diverged == sum(t["value"] is None for t in a.trials) and a.n_diverged >= 1
    c = tune_loss(score, {"gamma": Range(0.0, 5.0)}, {"gamma": 2.0}, **{**kw, "seed": 4})
    assert c.trials != a.trials


def test_tuning_fixes_a_bad_default_lr_on_a_real_problem_reproducibly(compose_cfg, tmp_path):
    # Adam at lr 1e-5 barely moves a digits MLP in 30 steps (chance accuracy): the known answer
    # is "a much larger lr"
    adam = [o.replace("optim=sgd", "optim=adam") for o in TINY]
    bad = [
        "compare=[ce,focal]",
        "optim.lr=0.00001",
        "tune.lr_range=[0.00001,0.1]",
        "tune.n_trials=6",
    ]
    _, first = _tune(compose_cfg, tmp_path / "a", bad, adam)
    _tune(compose_cfg, tmp_path / "b", bad, adam)
    for name in ("ce", "focal"):
        e = first["losses"][name]
        assert e["lr"] > 100 * 1e-5, e
        assert e["best_val"] > e["default_val"] + 0.2, e  # validation accuracy, chance is 0.1
        assert e["trials"][0]["lr"] == pytest.approx(1e-5)  # the default was trial 0
    assert (
        set(first["losses"]["focal"]["params"]) == {"gamma"}
        and first["losses"]["ce"]["params"] == {}
    )
    assert first["metric"] == "val/acc"  # tuned on validation, never on test
    saved = json.loads((tmp_path / "a" / "tuned.json").read_text())
    assert (
        saved["complete"]
        and saved["losses"] == json.loads((tmp_path / "b" / "tuned.json").read_text())["losses"]
    )
    assert load_tuned(tmp_path / "a")["losses"]["ce"]["lr"] == first["losses"]["ce"]["lr"]


def test_meta_test_takes_tuned_baselines_and_records_their_params(compose_cfg, tmp_path):
    _tune(compose_cfg, tmp_path / "t", ["compare=[ce,focal]", "tune.n_trials=3"])
    tuned = json.loads((tmp_path / "t" / "tuned.json").read_text())["losses"]

    def meta_test(out, extra):
        # the meta-test trains as the tuning did (30 steps, batches of 64): a file tuned for another
        # budget is refused
        cfg = compose_cfg("meta", TINY[:7] + ["compare=[ce,focal]", "meta_test.seeds=2"] + extra)
        pool = task_pool(cfg)
        out.mkdir()
        run_meta_test(cfg, ce, pool, instantiate(cfg.optim), out, NullLogger())
        return json.loads((out / "comparison.json").read_text())

    with_tuned = meta_test(tmp_path / "m1", [f"meta_test.tuned={tmp_path / 't' / 'tuned.json'}"])
    hp = with_tuned["hyperparameters"]
    assert hp["focal"]["params"]["gamma"] == pytest.approx(tuned["focal"]["params"]["gamma"])
    assert hp["focal"]["lr"] == pytest.approx(tuned["focal"]["lr"])
    assert hp["ce"]["lr"] == pytest.approx(tuned["ce"]["lr"]) and hp["ce"]["source"].startswith(
        "tuned"
    )
    assert hp["learned"]["lr"] == pytest.approx(0.05)  # the learned loss keeps the optimizer's lr
    plain = meta_test(
        tmp_path / "m2", []
    )  # default: unchanged, one lr for all, the config's params
    assert {n: h["lr"] for n, h in plain["hyperparameters"].items()} == dict.fromkeys(
        ("learned", "ce", "focal"), 0.05
    )
    assert plain["hyperparameters"]["focal"]["params"]["gamma"] == 2.0
    assert plain["hyperparameters"]["focal"]["source"] == "config"
    # learned (ce at 0.05) and baseline ce at the default are the same training: identical numbers
    assert plain["results"]["learned"] == plain["results"]["ce"]
    assert with_tuned["results"]["learned"] == plain["results"]["learned"]
    assert with_tuned["results"]["ce"] != plain["results"]["ce"]


def test_budget_accounting(compose_cfg, tmp_path):
    cfg, out = _tune(
        compose_cfg,
        tmp_path / "b",
        ["compare=[ce]", "tune.n_trials=null", "tune.budget_steps=100", "tune.seeds=2"],
    )
    cost = 30 * 2 * 1  # steps x seeds x tasks
    assert out["budget"] == {
        "budget_steps": 100,
        "cost_per_trial": cost,
        "n_trials": 1,
        "steps_used": cost,
        "lr_range": [0.005, 0.5],  # how the lr was searched: [lr / 10, lr * 10] around 0.05
        "sampler_seed": 0,
    }
    assert out["losses"]["ce"]["n_trials"] * cost <= 100
    assert trials_for_budget(1000, 60) == 16 and 16 * 60 <= 1000
    assert meta_training_steps({"steps": 200, "tasks_per_step": 8, "inner_steps": 5}) == 8000
    assert (
        meta_training_steps(
            {"mode": "online", "steps": 10, "online_update_every": 3, "inner_steps": 5}
        )
        == 30
    )
    with pytest.raises(ValueError, match="pays for no trial"):
        _tune(
            compose_cfg,
            tmp_path / "c",
            ["compare=[ce]", "tune.n_trials=null", "tune.budget_steps=29"],
        )
    assert (
        not (tmp_path / "c" / "tuned.json").exists() and not (tmp_path / "c" / "run.json").exists()
    )
    # budget_steps=meta: the learned loss's meta-training cost, 2 x 2 x 15 = 60 = two trials of
    # 30 x 1
    _, m = _tune(
        compose_cfg,
        tmp_path / "d",
        [
            "compare=[ce]",
            "tune.n_trials=null",
            "tune.budget_steps=meta",
            "meta.steps=2",
            "meta.tasks_per_step=2",
            "meta.inner_steps=15",
        ],
    )
    assert m["budget"]["budget_steps"] == 60 and m["losses"]["ce"]["n_trials"] == 2


@pytest.mark.parametrize(
    "bad, key",
    [
        (["tune.n_trials=0"], "tune.n_trials"),
        (["tune.budget_steps=500"], "give exactly one"),
        (["tune.n_trials=null"], "give exactly one"),
        (["tune.n_trials=null", "tune.budget_steps=-3"], "tune.budget_steps"),
        (["tune.metric=test/acc"], "tune.metric"),
        (["tune.lr_range=[0.1,0.01]"], "tune.lr_range"),
        (["tune.seeds=0"], "tune.seeds"),
        (["compare=[ce,nope]"], "compare"),
        (["meta_test.tuned=/nonexistent/tuned.json"], "meta_test.tuned"),
    ],
)
def test_bad_settings_are_refused(compose_cfg, bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(compose_cfg("tune", TINY + bad))


def test_a_tuned_file_for_another_run_is_refused(compose_cfg, tmp_path):
    _tune(compose_cfg, tmp_path / "t", ["compare=[focal]", "tune.n_trials=1"])
    t = load_tuned(tmp_path / "t" / "tuned.json")
    targets = {"focal": "metaloss.losses.fixed.focal", "ce": "metaloss.losses.fixed.ce"}
    assert tuned_for(t, ["focal"], task="digits", optim="sgd", targets=targets)["focal"]["lr"] > 0
    with pytest.raises(TunedFileError, match="task"):
        tuned_for(t, ["focal"], task="sine", optim="sgd", targets=targets)
    with pytest.raises(TunedFileError, match="optimizer"):
        tuned_for(t, ["focal"], task="digits", optim="adam", targets=targets)
    with pytest.raises(TunedFileError, match="no tuned values for ce"):
        tuned_for(t, ["focal", "ce"], task="digits", optim="sgd", targets=targets)
    # a file that does not record what it was tuned with (an older metaloss-tune) is refused
    old = {k: v for k, v in t.items() if k not in ("task_config", "model_config")}
    setup = {k: t[k] for k in ("model", "steps", "batch_size", "model_config", "task_config")}
    assert tuned_for(t, ["focal"], task="digits", optim="sgd", targets=targets, setup=setup)
    with pytest.raises(TunedFileError, match="does not record model_config, task_config"):
        tuned_for(old, ["focal"], task="digits", optim="sgd", targets=targets, setup=setup)
    (tmp_path / "junk.json").write_text('{"losses": {}}')
    with pytest.raises(ConfigError, match="meta_test.tuned"):
        check_config(compose_cfg("meta", [f"meta_test.tuned={tmp_path / 'junk.json'}"]))


def test_a_file_tuned_for_another_budget_is_refused(compose_cfg, tmp_path):
    _tune(compose_cfg, tmp_path / "t", ["compare=[ce]", "tune.n_trials=1"])
    cfg = compose_cfg(
        "meta",
        TINY[:5]
        + [
            "compare=[ce]",
            "meta_test.seeds=2",
            "meta_test.steps=10",
            f"meta_test.tuned={tmp_path / 't' / 'tuned.json'}",
        ],
    )
    with pytest.raises(TunedFileError, match="steps: 30 there, 10 here"):
        run_meta_test(cfg, ce, task_pool(cfg), instantiate(cfg.optim), tmp_path, NullLogger())


def test_a_file_tuned_on_other_data_or_another_model_size_is_refused(compose_cfg, tmp_path):
    # the task *name* matches (digits) but the data do not: values tuned on clean labels mean
    # nothing under 40% label noise, nor a learning rate tuned for a 16-unit MLP for a 64-unit one
    _tune(compose_cfg, tmp_path / "t", ["compare=[ce]", "tune.n_trials=1"])
    path = f"meta_test.tuned={tmp_path / 't' / 'tuned.json'}"
    for change, message in (
        (["task.label_noise.rate=0.4"], r"task_config.label_noise.rate: 0.0 there, 0.4 here"),
        (["model.hidden=[64]"], r"model_config.hidden: \[16\] there, \[64\] here"),
    ):
        cfg = compose_cfg("meta", TINY[:-1] + ["compare=[ce]", "meta_test.seeds=2", path] + change)
        with pytest.raises(TunedFileError, match=message):
            run_meta_test(cfg, ce, task_pool(cfg), instantiate(cfg.optim), tmp_path, NullLogger())


def test_matched_budget_counts_every_candidate_of_es_and_cmaes(compose_cfg):
    from metaloss.cli.tune import learned_cost

    meta = {"steps": 10, "tasks_per_step": 2, "inner_steps": 5}
    cfg = compose_cfg("tune", TINY + ["loss=taylorglo"])
    task = task_pool(cfg)[0]
    one = meta_training_steps(cfg.meta)
    assert learned_cost(cfg, task) == one  # a hypergradient: one inner run per task
    es = compose_cfg("tune", TINY + ["loss=taylorglo", "hypergrad=es", "hypergrad.population=6"])
    assert learned_cost(es, task) == 12 * one  # antithetic: 2P runs
    cma = compose_cfg("tune", TINY + ["loss=taylorglo", "meta_optim=cmaes"])
    assert (
        learned_cost(cma, task) == 10 * one
    )  # cma's default λ for TaylorGLO's 8 parameters: 4 + ⌊3 ln 8⌋
    assert (
        learned_cost(
            compose_cfg(
                "tune", TINY + ["loss=taylorglo", "meta_optim=cmaes", "meta_optim.popsize=7"]
            ),
            task,
        )
        == 7 * one
    )
    assert meta_training_steps(meta, 10) == 10 * meta_training_steps(meta) == 1000


def test_the_comparison_records_each_baselines_tuning_compute_and_warns_when_short(
    compose_cfg, tmp_path, caplog
):
    import logging

    _tune(compose_cfg, tmp_path / "t", ["compare=[ce]", "tune.n_trials=2"])
    used = load_tuned(tmp_path / "t" / "tuned.json")["losses"]["ce"]["steps_used"]
    cfg = compose_cfg(
        "meta",
        TINY[:-1]
        + ["compare=[ce]", "meta_test.seeds=2", f"meta_test.tuned={tmp_path / 't' / 'tuned.json'}"],
    )
    for cost, short in ((used, False), (used + 1, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="metaloss"):
            run_meta_test(
                cfg,
                ce,
                task_pool(cfg),
                instantiate(cfg.optim),
                tmp_path / str(cost),
                NullLogger(),
                meta_training_steps=cost,
            )
        hp = json.loads((tmp_path / str(cost) / "comparison.json").read_text())["hyperparameters"]
        assert (
            hp["ce"]["tuning_steps"] == used == 2 * 30
            and hp["learned"]["meta_training_steps"] == cost
        )
        assert ("tuned with less compute" in caplog.text) == short


def test_a_tuned_value_on_the_edge_of_its_range_is_flagged(compose_cfg, tmp_path, caplog):
    from metaloss.tune import at_edge

    space = {"lr": Range(1e-3, 1e-1, log=True), "gamma": Range(0.0, 5.0)}
    assert at_edge({"lr": 1.02e-3, "gamma": 2.0}, space) == ["lr"]  # log scale: 1.02e-3 hugs 1e-3
    assert at_edge({"lr": 1e-2, "gamma": 4.95}, space) == ["gamma"]
    assert at_edge({"lr": 1e-2, "gamma": 2.5}, space) == []
    # through the app: a range with an absurd upper edge forces the lr to its lower edge
    import logging

    with caplog.at_level(logging.WARNING, logger="metaloss"):
        _tune(
            compose_cfg,
            tmp_path / "t",
            ["compare=[ce]", "tune.n_trials=1", "tune.lr_range=[1e-9,1e-8]"],
        )
    assert load_tuned(tmp_path / "t" / "tuned.json")["losses"]["ce"]["at_edge"] == ["lr"]
    assert "ce: tuned lr at the edge" in caplog.text and "widen tune.lr_range" in caplog.text


# ---------------------------------------------------------------- tuned.json is data (issue 15)

RECORDED = Path(__file__).resolve().parents[1] / "experiments" / "outliers_robust" / "tuned.json"


def _edited(tmp_path, edit, raw=None):
    """A copy of a recorded tuned.json with ``edit(data)`` applied (``raw``: replace text)."""
    data = json.loads(RECORDED.read_text())
    edit(data)
    text = json.dumps(data)
    for a, b in (raw or {}).items():
        text = text.replace(a, b)
    path = tmp_path / "tuned.json"
    path.write_text(text)
    return path


def _set(*keys, value):
    def edit(data):
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, raw, message",
    [
        (
            _set("losses", "huber", "params", "_target_", value="builtins.open"),
            None,
            r"losses\.huber\.params\._target_: tuned.json holds values only, never code",
        ),
        (
            _set("losses", "huber", "_target_", value="os.remove"),
            None,
            r"losses\.huber\._target_: .*never code",
        ),
        (_set("_target_", value="os.remove"), None, r"^.*\n  _target_: .*never code"),
        (
            _set("losses", "huber", "params", "delta", value=-1.0),
            None,
            r"losses\.huber\.params\.delta = -1\.0: must be a number > 0",
        ),
        (
            _set("losses", "huber", "params", "delta", value=12345.5),
            {"12345.5": "NaN"},
            r"params\.delta = nan: must be",
        ),
        (
            _set("losses", "huber", "params", "delta", value=12345.5),
            {"12345.5": "Infinity"},
            r"params\.delta = inf: must be",
        ),
        (
            _set("losses", "huber", "params", "delta", value=True),
            None,
            r"params\.delta = True: must be a number > 0 \(the valid values of huber's delta\)",
        ),
        (
            _set("losses", "huber", "params", "delta", value="1.0"),
            None,
            r"params\.delta = '1\.0': must be a number",
        ),
        (
            _set("losses", "quantile", "params", "tau", value=1.5),
            None,
            r"params\.tau = 1\.5: must be a number in \(0, 1\)",
        ),
        (
            _set("losses", "huber", "params", "gamma", value=2.0),
            None,
            r"losses\.huber\.params\.gamma: not a tuned hyper-parameter of huber \(it has delta\)",
        ),
        (
            _set("losses", "mse", "params", "delta", value=1.0),
            None,
            r"params\.delta: not a tuned hyper-parameter of mse",
        ),
        (
            _set("losses", "huber", "lr", value=12345.5),
            {"12345.5": "NaN"},
            r"losses\.huber\.lr = nan: must be a number > 0",
        ),
        (
            _set("losses", "huber", "lr", value=-0.01),
            None,
            r"losses\.huber\.lr = -0\.01: must be a number > 0",
        ),
        (
            _set("losses", "huber", "lr", value=0),
            None,
            r"losses\.huber\.lr = 0: must be a number > 0",
        ),
        (
            _set("losses", "huber", "lr", value=True),
            None,
            r"losses\.huber\.lr = True: must be a number > 0",
        ),
        (
            _set("losses", "huber", "lr", value=12345.5),
            {"12345.5": "Infinity"},
            r"losses\.huber\.lr = inf",
        ),
        (_set("extra", value=1), None, r"\n  extra: unknown key"),
        (_set("losses", "huber", "note", value="x"), None, r"losses\.huber\.note: unknown key"),
        (_set("budget", "bonus", value=1), None, r"budget\.bonus: unknown key"),
        (_set("steps", value="2000"), None, r"steps = '2000': must be an integer >= 1"),
        (_set("complete", value="yes"), None, r"complete = 'yes': must be true or false"),
        (
            _set("losses", "huber", value=[1, 2]),
            None,
            r"losses\.huber = \[1, 2\]: must be a mapping",
        ),
        (lambda d: d["losses"]["huber"].pop("target"), None, r"losses\.huber\.target: missing"),
    ],
)
def test_a_hand_edited_tuned_json_is_refused_naming_file_and_key(tmp_path, edit, raw, message):
    path = _edited(tmp_path, edit, raw)
    with pytest.raises(TunedFileError, match=message) as e:
        load_tuned(path)
    assert str(path) in str(e.value)


def test_a_tuned_json_nested_past_the_parsers_depth_is_refused_not_a_crash(tmp_path):
    (tmp_path / "tuned.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TunedFileError, match="cannot read tuned baselines"):
        load_tuned(tmp_path / "tuned.json")


def test_a_recorded_tuned_json_is_valid_data():
    assert load_tuned(RECORDED)["losses"]["huber"]["params"]["delta"] > 0


def test_a_target_in_tuned_params_is_never_called(compose_cfg, tmp_path):
    # today's bug: a `_target_` in a loss's params reached Hydra's instantiate, which called it
    # (it truncated a file); it is refused at check_config, before any data is made
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = _edited(
        tmp_path,
        _set(
            "losses",
            "huber",
            "params",
            value={"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        ),
    )
    cfg = compose_cfg("meta", ["experiment=outliers_robust", f"meta_test.tuned={path}"])
    with pytest.raises(ConfigError, match=r"(?s)meta_test\.tuned.*losses\.huber\.params\._target_"):
        check_config(cfg)
    with pytest.raises(TunedFileError, match="never code"):
        run_meta_test(cfg, ce, task_pool(cfg), instantiate(cfg.optim), tmp_path, NullLogger())
    assert victim.read_text() == "precious"
    # and the loss options refuse code-naming overrides whoever passes them
    from metaloss.config import loss_option

    with pytest.raises(ValueError, match="may not name code"):
        loss_option("huber", task_pool(cfg)[0], cfg, {"_target_": "builtins.open"})


# -------------------------------------------------------------- the fit check, before meta-training


def _tuned_tiny(compose_cfg, tmp_path, extra=()):
    _tune(compose_cfg, tmp_path / "t", ["compare=[ce]", "tune.n_trials=1", *extra])
    return tmp_path / "t" / "tuned.json"


@pytest.mark.parametrize(
    "change, message",
    [
        (["optim.weight_decay=0.01"], r"optim_config\.weight_decay: 0\.0 there, 0\.01 here"),
        (["dtype=float64"], r"dtype: 'float32' there, 'float64' here"),
        (["optim.lr=0.1"], r"default_lr: 0\.05 there, 0\.1 here"),
        (["optim=momentum", "optim.lr=0.05"], r"optimizer 'sgd', this run uses 'momentum'"),
        (["meta_test.seeds=20001"], r"tuned from seeds \[20000\], which the meta-test uses too"),
        (
            ["meta_test.metric=test/balanced_acc"],
            r"tuned on 'val/acc', but this meta-test compares on 'test/balanced_acc'",
        ),
    ],
)
def test_a_tuned_file_for_other_training_settings_is_refused(
    compose_cfg, tmp_path, change, message
):
    from metaloss.cli.comparison import check_tuned

    path = _tuned_tiny(compose_cfg, tmp_path)
    cfg = compose_cfg("meta", TINY[:-1] + ["compare=[ce]", f"meta_test.tuned={path}"] + change)
    pool = task_pool(cfg)
    with pytest.raises(TunedFileError, match=message):
        check_tuned(cfg, pool, instantiate(cfg.optim))


def test_the_momentum_of_a_tuned_optimizer_is_part_of_the_fit(compose_cfg, tmp_path):
    from metaloss.cli.comparison import check_tuned

    path = _tuned_tiny(compose_cfg, tmp_path, ["optim=momentum"])
    base = TINY[:-1] + ["optim=momentum", "compare=[ce]", f"meta_test.tuned={path}"]
    cfg = compose_cfg("meta", base)
    check_tuned(cfg, task_pool(cfg), instantiate(cfg.optim))  # the same setup fits
    cfg = compose_cfg("meta", base + ["optim.momentum=0.5"])
    with pytest.raises(TunedFileError, match=r"optim_config\.momentum: 0\.9 there, 0\.5 here"):
        check_tuned(cfg, task_pool(cfg), instantiate(cfg.optim))


def test_a_file_tuned_on_fewer_tasks_of_a_family_is_refused(compose_cfg, tmp_path):
    from metaloss.tune import setup_record

    path = _tuned_tiny(compose_cfg, tmp_path)
    t = load_tuned(path)
    cfg = compose_cfg("meta", TINY[:-1] + ["compare=[ce]"])
    targets = {"ce": "metaloss.losses.fixed.ce"}
    tuned_for(t, ["ce"], task="digits", optim="sgd", targets=targets, setup=setup_record(cfg, 1))
    with pytest.raises(TunedFileError, match="tasks: 1 there, 8 here"):
        tuned_for(
            t, ["ce"], task="digits", optim="sgd", targets=targets, setup=setup_record(cfg, 8)
        )


def test_meta_and_eval_refuse_a_mismatching_tuned_file_before_any_training(
    compose_cfg, tmp_path, monkeypatch
):
    from metaloss.cli import eval as eval_app
    from metaloss.cli import meta as meta_app
    from metaloss.losses.io import save_learned_loss
    from metaloss.losses.taylor import TaylorGLO

    path = _tuned_tiny(compose_cfg, tmp_path)

    def started(*a, **k):
        raise AssertionError("training started with a tuned.json that does not fit")

    monkeypatch.setattr(meta_app, "offline_steps", started)
    monkeypatch.setattr(meta_app, "online_steps", started)
    monkeypatch.setattr(eval_app, "run_meta_test", started)
    wd = ["optim.weight_decay=0.01", "compare=[ce]", f"meta_test.tuned={path}"]
    cfg = compose_cfg("meta", TINY[:-1] + ["loss=taylorglo", "meta.steps=1000"] + wd)
    with pytest.raises(TunedFileError, match="weight_decay"):
        meta_app.run(cfg, tmp_path / "meta", "taylorglo")
    assert not (tmp_path / "meta" / "checkpoint.pt").exists()
    saved = save_learned_loss(
        TaylorGLO(), tmp_path / "learned.pt", steps=0, complete=True, task="digits"
    )
    cfg = compose_cfg("eval", TINY[:-1] + [f"loss_path={saved}"] + wd)
    with pytest.raises(TunedFileError, match="weight_decay"):
        eval_app.run(cfg, tmp_path / "eval")


# --------------------------------------------------------- resume, never destroy (issue 15, item 3)


def _journal(path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


@pytest.mark.parametrize("lr", [0.001, 5.0])  # default lr inside / outside the lr range
def test_tune_loss_resumes_from_its_journal_as_if_never_stopped(tmp_path, lr):
    def score(p, trial_lr):
        return -((p["gamma"] - 1.3) ** 2) - (math.log10(trial_lr) + 2) ** 2

    kw = dict(lr=lr, lr_space=Range(1e-4, 1.0, log=True), n_trials=12, direction="maximize", seed=3)
    space, defaults = {"gamma": Range(0.0, 5.0)}, {"gamma": 2.0}
    ref = tune_loss(score, space, defaults, storage=_journal(tmp_path / "ref.journal"), **kw)
    calls = []

    def dies_at_6(p, trial_lr):
        calls.append(trial_lr)
        if len(calls) == 6:
            raise KeyboardInterrupt  # a killed process: trial 6 stays "running" in the journal
        return score(p, trial_lr)

    with pytest.raises(KeyboardInterrupt):
        tune_loss(dies_at_6, space, defaults, storage=_journal(tmp_path / "j.journal"), **kw)
    calls.clear()
    again = tune_loss(
        lambda p, x: calls.append(x) or score(p, x),
        space,
        defaults,
        storage=_journal(tmp_path / "j.journal"),
        **kw,
    )
    assert (
        len(calls) == 12 - 5 and again.resumed == 5
    )  # the 5 finished trials are kept, the 6th is run again
    assert again.trials == ref.trials and again.params == ref.params and again.lr == ref.lr
    assert (
        again.default_val == ref.default_val == score(defaults, lr)
    )  # the true default, never clipped
    assert again.trials[0] == {"params": defaults, "lr": lr, "value": score(defaults, lr)}
    assert ref.default_outside_range == (lr == 5.0)
    calls.clear()
    done = tune_loss(
        lambda p, x: calls.append(x) or score(p, x),
        space,
        defaults,
        storage=_journal(tmp_path / "j.journal"),
        **kw,
    )
    assert calls == [] and done.trials == ref.trials  # a finished study costs no training


def test_a_default_lr_outside_the_range_is_evaluated_as_it_is(compose_cfg, tmp_path):
    # sgd's default lr 0.05 lies above tune.lr_range=[0.001, 0.01]: default_val is the value of
    # lr 0.05 itself (the same as a run whose range holds it), not of lr 0.01
    _, out = _tune(
        compose_cfg,
        tmp_path / "a",
        ["compare=[focal]", "tune.n_trials=3", "tune.lr_range=[0.001,0.01]"],
    )
    _, inside = _tune(compose_cfg, tmp_path / "b", ["compare=[focal]", "tune.n_trials=1"])
    e = out["losses"]["focal"]
    assert (
        e["default_outside_range"] is True
        and inside["losses"]["focal"]["default_outside_range"] is False
    )
    assert e["trials"][0] == {"params": {"gamma": 2.0}, "lr": 0.05, "value": e["default_val"]}
    assert e["default_val"] == inside["losses"]["focal"]["default_val"]
    assert e["n_trials"] == 3 and e["steps_used"] == 3 * 30 and e["best_val"] >= e["default_val"]
    assert all(0.001 <= t["lr"] <= 0.01 for t in e["trials"][1:])
    load_tuned(tmp_path / "a" / "tuned.json")


def test_tune_metric_is_checked_against_the_task_kind_before_any_training(
    compose_cfg, tmp_path, monkeypatch
):
    monkeypatch.setattr(metaloss.tune, "compare_losses", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(
        ConfigError, match=r"tune\.metric = 'val/mse': must be one of val/acc.*classification"
    ):
        _tune(
            compose_cfg, tmp_path / "m", ["compare=[ce]", "tune.n_trials=1", "tune.metric=val/mse"]
        )


def test_metaloss_tune_resumes_where_it_stopped_and_never_overwrites_a_complete_result(
    compose_cfg, tmp_path, monkeypatch, caplog
):
    import logging

    settings = ["compare=[ce,focal]", "tune.n_trials=3"]
    _, ref = _tune(compose_cfg, tmp_path / "ref", settings)
    real, calls = metaloss.tune.compare_losses, []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # Ctrl-C / a killed process half way through focal's trials
        return real(*a, **k)

    monkeypatch.setattr(metaloss.tune, "compare_losses", counted)
    stop_at = 5  # ce's 3 trials, focal's first, then stopped
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _tune(compose_cfg, out, settings)
    partial = json.loads((out / "tuned.json").read_text())
    assert not partial["complete"] and list(partial["losses"]) == ["ce"]
    with open(out / "optuna.journal", "ab") as f:  # a kill -9 in the middle of a journal write
        f.write(b'{"op_code": 4, "worker_id": "x", "trial_')
    calls.clear()
    stop_at = 0
    with caplog.at_level(logging.INFO, logger="metaloss"):
        _, resumed = _tune(compose_cfg, out, settings)
    assert len(calls) == 2  # only focal's last two trials: ce and focal's first are not run again
    assert "ce: resumed" in caplog.text and "3 of 3 trials were done already" in caplog.text
    assert resumed["complete"] and resumed["losses"] == ref["losses"]  # as if never stopped
    before = (out / "tuned.json").read_bytes()
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaloss"):
        _, again = _tune(compose_cfg, out, settings)
    assert calls == [] and (out / "tuned.json").read_bytes() == before
    assert "is complete" in caplog.text and "nothing overwritten" in caplog.text
    assert again["losses"] == ref["losses"]
    # a complete tuned.json edited by hand is refused, never replaced
    (out / "tuned.json").write_text(
        before.decode().replace('"complete": true', '"complete": true, "x": 1')
    )
    with pytest.raises(TunedFileError, match="(?s)in the way.*x: unknown key"):
        _tune(compose_cfg, out, settings)


def test_a_storage_holding_values_outside_the_search_is_refused(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution

    space, kw = (
        {"gamma": Range(0.0, 5.0)},
        dict(
            lr=0.01,
            lr_space=Range(1e-3, 0.1, log=True),
            direction="maximize",
            seed=0,
            storage=_journal(tmp_path / "j.journal"),
            study_name="focal",
        ),
    )
    tune_loss(lambda p, lr: -p["gamma"], space, {"gamma": 2.0}, n_trials=2, **kw)
    study = optuna.load_study(study_name="focal", storage=_journal(tmp_path / "j.journal"))
    study.add_trial(
        optuna.trial.create_trial(  # as if the journal were edited by hand
            params={"gamma": -3.0, "lr": 0.01},
            value=3.0,
            distributions={
                "gamma": FloatDistribution(-5.0, 5.0),
                "lr": FloatDistribution(1e-3, 0.1, log=True),
            },
        )
    )
    with pytest.raises(
        ValueError, match=r"study 'focal' in the storage holds trial 2 .*gamma in \[0, 5\]"
    ):
        tune_loss(lambda p, lr: -p["gamma"], space, {"gamma": 2.0}, n_trials=3, **kw)


def test_a_storage_holding_an_edited_default_is_refused(tmp_path):
    """The default evaluated apart (its lr outside the range searched) is read back from the
    storage on resume: an edited one (lr 1000, a made-up value) is refused, never the winner."""
    import optuna

    space, kw = (
        {"gamma": Range(0.0, 5.0)},
        dict(
            lr=5.0,
            lr_space=Range(1e-3, 0.1, log=True),
            direction="maximize",
            seed=0,
            storage=_journal(tmp_path / "j.journal"),
            study_name="focal",
        ),
    )
    first = tune_loss(lambda p, lr: -p["gamma"] - lr, space, {"gamma": 2.0}, n_trials=2, **kw)
    assert first.default_outside_range and first.trials[0]["lr"] == 5.0
    study = optuna.load_study(study_name="focal", storage=_journal(tmp_path / "j.journal"))
    study.set_user_attr("default", {"params": {"gamma": 2.0}, "lr": 1000.0, "value": 99.0})
    with pytest.raises(TunedFileError, match=r"study 'focal' in the storage holds a default trial"):
        tune_loss(lambda p, lr: -p["gamma"] - lr, space, {"gamma": 2.0}, n_trials=3, **kw)


# ------------------------------------------------ the learned loss's lr, fair in both directions


def test_the_learned_losss_lr_is_tuned_with_the_baselines_budget_and_its_default_kept(
    compose_cfg, tmp_path
):
    _tune(compose_cfg, tmp_path / "t", ["compare=[ce,focal]", "tune.n_trials=3"])
    record = json.loads((tmp_path / "t" / "tuned.json").read_text())
    base = TINY[:7] + ["compare=[ce,focal]", "meta_test.seeds=2"]
    cfg = compose_cfg(
        "meta", base + [f"meta_test.tuned={tmp_path / 't'}", "meta_test.tune_learned_lr=true"]
    )
    pool, out = task_pool(cfg), tmp_path / "m"
    out.mkdir()
    run_meta_test(cfg, ce, pool, instantiate(cfg.optim), out, NullLogger())
    comp = json.loads((out / "comparison.json").read_text())
    own = comp["hyperparameters"]["learned"]
    focal = comp["hyperparameters"]["focal"]
    # the same machinery and budget as each baseline: trials, inner steps spent, the default lr
    assert own["n_trials"] == record["losses"]["focal"]["n_trials"] == 3
    assert own["tuning_steps"] == focal["tuning_steps"] and own["default_lr"] == 0.05
    assert 0.005 <= own["lr"] <= 0.5 and "tuned like the baselines" in own["source"]
    # the same loss (ce) tuned the same way lands on the lr and validation value ce's own tuning
    # found: one scorer, one study
    assert own["best_val"] == pytest.approx(record["losses"]["ce"]["best_val"])
    assert own["lr"] != own["default_lr"]  # 30 steps at 0.05 barely train: tuning moves it
    kept = comp["learned_at_default_lr"]  # the untuned learned loss stays in the record
    assert kept["lr"] == 0.05 and len(kept["results"]["test/acc"]) == 2
    assert "at its default inner lr (0.05, before tuning)" in (out / "comparison.md").read_text()
    with pytest.raises(ConfigError, match="tune_learned_lr = true needs meta_test.tuned"):
        check_config(compose_cfg("meta", base + ["meta_test.tune_learned_lr=true"]))


def test_a_meta_learned_inner_lr_is_saved_with_the_loss_and_trained_with(compose_cfg, tmp_path):
    from metaloss.cli import eval as eval_app
    from metaloss.cli import meta as meta_app
    from metaloss.losses.io import CorruptLossFile, load_learned_loss

    over = ["logger=none", "progress=false", "meta.steps=3", "meta.tasks_per_step=2"]
    over += ["meta.inner_steps=2", "meta_test.seeds=2", "meta.learn_inner_lr=true"]
    over += ["model.hidden=[8]", "loss.hidden=[8]", "meta_optim.lr=0.05"]
    meta_app.run(compose_cfg("meta", over), tmp_path / "m", "ml3")
    saved = load_learned_loss(tmp_path / "m" / "learned_loss.pt")
    lr = saved.meta["inner_lr"]
    assert lr > 0 and lr != pytest.approx(0.05, rel=1e-6)  # moved from optim.lr by meta-training
    comp = json.loads((tmp_path / "m" / "comparison.json").read_text())
    learned = comp["hyperparameters"]["learned"]
    assert learned["lr"] == lr and learned["source"].startswith("meta-learned")
    assert comp["hyperparameters"]["mse"]["lr"] == 0.05  # the baselines keep the meta-test's lr
    eval_cfg = ["logger=none", "progress=false", f"loss_path={tmp_path / 'm' / 'learned_loss.pt'}"]
    eval_app.run(compose_cfg("eval", eval_cfg + ["meta_test.seeds=2"]), tmp_path / "e", set())
    again = json.loads((tmp_path / "e" / "comparison.json").read_text())
    assert again["hyperparameters"]["learned"]["lr"] == lr  # metaloss-eval trains with it too
    blob = torch.load(tmp_path / "m" / "learned_loss.pt", weights_only=True)
    for bad in (0.0, -0.1, True):  # a hand-edited file: refused, naming the key
        blob["meta"]["inner_lr"] = bad
        torch.save(blob, tmp_path / "bad.pt")
        with pytest.raises(CorruptLossFile, match="meta.inner_lr"):
            load_learned_loss(tmp_path / "bad.pt")


def test_the_learned_lr_is_not_tuned_where_the_baselines_lr_was_not(compose_cfg, tmp_path):
    """Baselines tuned with tune.lr=false: tuning the learned loss's lr alone would be unfair
    to them, so it is refused before any training; so is a file that lacks the budget."""
    from metaloss.cli.comparison import check_tuned

    _tune(compose_cfg, tmp_path / "t", ["compare=[ce]", "tune.n_trials=1", "tune.lr=false"])
    base = TINY[:7] + ["compare=[ce]", "meta_test.tune_learned_lr=true"]
    cfg = compose_cfg("meta", base + [f"meta_test.tuned={tmp_path / 't'}"])
    with pytest.raises(ConfigError, match="tuned without their lr"):
        check_tuned(cfg, task_pool(cfg), instantiate(cfg.optim))
    path = tmp_path / "t" / "tuned.json"
    record = json.loads(path.read_text())
    del record["budget"]
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="has no n_trials, cost_per_trial"):
        check_tuned(cfg, task_pool(cfg), instantiate(cfg.optim))

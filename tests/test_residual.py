"""Warm starts (metaloss.residual): a family searched as a residual on a named baseline is that
baseline exactly at the start, reads the baseline's tuned values from a tuned.json, moves
only by meta-training, and saves and reloads like any learned loss."""

from __future__ import annotations

import json

import pytest
import torch

from metaloss.cli import meta as meta_app
from metaloss.cli import tune as tune_app
from metaloss.config import instantiate_loss, tuned_lr
from metaloss.losses.base import loss_context
from metaloss.losses.fixed import logit_adjusted_ce
from metaloss.losses.io import CorruptLossFile, load_learned_loss, save_learned_loss
from metaloss.residual import Residual
from metaloss.runtime import task_pool
from metaloss.tune import TunedFileError

TINY = ["logger=none", "progress=false", "task=digits", "model.hidden=[16]", "optim=sgd"]
META = ["meta.steps=3", "meta.tasks_per_step=2", "meta.inner_steps=3", "meta_test.seeds=2"]


def _batch(task, n=6):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(n, task.num_classes, generator=g)
    target = torch.randint(0, task.num_classes, (n,), generator=g)
    return pred, target, loss_context(task.class_counts, None, 0.5)


@pytest.mark.parametrize("family", ["taylorglo", "ml3"])
def test_at_the_start_it_is_the_base_at_its_tuned_values(compose_cfg, tmp_path, family):
    tune_app.run(
        compose_cfg(
            "tune",
            TINY
            + ["compare=[logit_adjusted_ce]", "tune.n_trials=2", "tune.seeds=1"]
            + ["meta_test.steps=20", "tune.lr=false"],
        ),
        tmp_path / "t",
    )
    path, tau = tmp_path / "t" / "tuned.json", 0.37  # a tuned value other than the default (1)
    record = json.loads(path.read_text())
    record["losses"]["logit_adjusted_ce"]["params"]["tau"] = tau
    path.write_text(json.dumps(record))
    cfg = compose_cfg(
        "meta",
        TINY
        + ["loss=residual", "loss.base=logit_adjusted_ce", f"loss.family={family}"]
        + [f"meta_test.tuned={tmp_path / 't'}", "meta_test.steps=20"],
    )
    task = task_pool(cfg)[0]
    loss = instantiate_loss(cfg.loss, task)
    assert loss.init_kwargs["base_params"] == {"tau": tau}  # read from the file
    pred, target, ctx = _batch(task)
    expected = logit_adjusted_ce(pred, target, tau=tau, **ctx)
    assert torch.allclose(loss(pred, target, **ctx), expected, atol=1e-6)
    # φ is the family's; the start is kept apart and does not move with it
    with torch.no_grad():
        for p in loss.family_loss.parameters():
            p.add_(0.1)
    assert not torch.allclose(loss(pred, target, **ctx), expected, atol=1e-4)
    assert all(not b.requires_grad for b in loss.start().values())


def test_meta_training_moves_it_and_the_saved_loss_reloads_and_is_checked(compose_cfg, tmp_path):
    cfg = compose_cfg("meta", TINY + META + ["loss=residual", "compare=[ce]"])
    meta_app.run(cfg, tmp_path / "m", "residual")
    loaded = load_learned_loss(tmp_path / "m" / "learned_loss.pt")
    assert isinstance(loaded, Residual) and loaded.init_kwargs["base"] == "ce"
    moved = {k: v for k, v in loaded.family_loss.state_dict().items()}
    start = loaded.start()
    assert any(not torch.equal(moved[k], start[k]) for k in start)  # the search moved φ
    comp = json.loads((tmp_path / "m" / "comparison.json").read_text())
    assert set(comp["results"]) == {"learned", "ce"}
    blob = torch.load(tmp_path / "m" / "learned_loss.pt", weights_only=True)
    good = dict(blob["init_kwargs"])
    for bad, message in [
        ({"base_params": {"_target_": "os.system"}}, "Hydra key"),  # a file never names code
        ({"base_params": {"tau": -3.0}}, "tau"),  # nor a value out of the base's range
        # nor a nested file whose loading would import a module of its choosing
        (
            {"family": "learned", "family_params": {"path": "x.pt", "trusted_modules": ["os"]}},
            "must be a parametric loss",
        ),
        ({"base": "../model/mlp"}, "must be the name of a loss option"),  # nor another group
        ({"family_params": {"init": "bogus"}}, "family_params.init"),  # the family's own rules
    ]:
        blob["init_kwargs"] = {**good, **bad}
        torch.save(blob, tmp_path / "bad.pt")
        with pytest.raises(CorruptLossFile, match=message):
            load_learned_loss(tmp_path / "bad.pt")


def test_a_base_and_family_with_no_kind_in_common_are_refused():
    with pytest.raises(ValueError, match="fit no task kind in common"):
        Residual(base="dice", family="taylorglo")
    with pytest.raises(ValueError, match="must be a parametric loss"):
        Residual(base="ce", family="focal")


def test_a_warm_start_at_its_base_s_tuned_lr_reads_that_lr_from_its_tuned_json(
    compose_cfg, tmp_path
):
    # conf/experiment/*_warm_lr.yaml: meta-training and the held-out selection train at the lr
    # the base was tuned to; the meta-test's default lr stays the case's (the file's default_lr)
    cfg = compose_cfg("meta", ["experiment=noise_sym40_warm_lr"])
    tuned = json.loads(open(cfg.meta_test.tuned).read())
    assert cfg.loss.base == "gce"
    assert cfg.optim.lr == tuned["losses"]["gce"]["lr"] != tuned["default_lr"]
    assert cfg.meta_test.lr == tuned["default_lr"]
    assert cfg.loss.base_params == tuned["losses"]["gce"]["params"]
    # debug drops meta_test.tuned: the meta-test's lr, the only case without a file
    debug = compose_cfg("meta", ["experiment=noise_sym40_warm_lr", "debug=default"])
    assert debug.optim.lr == debug.meta_test.lr == 0.01
    # never a silent default otherwise: a base the file did not tune, a base tuned without its
    # lr, no file at all
    with pytest.raises(TunedFileError, match="has no tuned entry for 'focal'"):
        tuned_lr(cfg.meta_test.tuned, "focal")
    tuned["losses"]["gce"]["lr"] = None
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    with pytest.raises(TunedFileError, match="tuned 'gce' without its lr"):
        tuned_lr(tmp_path / "tuned.json", "gce")
    with pytest.raises(ValueError, match="no tuned.json to read 'gce'"):
        tuned_lr(None, "gce")
    for bad in ("abc", -1, "nan"):  # a fallback lr that is no lr
        with pytest.raises(ValueError, match="the lr without a file"):
            tuned_lr(None, "gce", bad)


@pytest.mark.parametrize(
    "name", ["noise_sym40_warm_lr", "noise_pair40_warm_lr", "longtail100_warm_lr"]
)
def test_a_warm_start_at_its_base_s_lr_keeps_the_setup_its_baselines_were_tuned_with(
    compose_cfg, name
):
    # only meta-training's lr moves: the meta-test's setup (default lr included) is the one
    # its tuned.json records, so the tuned baselines are accepted as they are
    from metaloss.tune import load_tuned, setup_record, tuned_for

    cfg = compose_cfg("meta", [f"experiment={name}"])
    tuned = load_tuned(cfg.meta_test.tuned)
    assert cfg.optim.lr == tuned["losses"][cfg.loss.base]["lr"]
    entries = tuned_for(
        tuned,
        list(cfg.compare),
        task=tuned["task"],
        optim=tuned["optim"],
        targets={n: tuned["losses"][n]["target"] for n in cfg.compare},
        setup=setup_record(cfg),
        test_seeds=int(cfg.meta_test.seeds),
    )
    assert set(entries) == set(cfg.compare)


def test_a_family_started_at_its_base_never_rewards_lowering_the_true_class(compose_cfg):
    # longtail100_warm_at_base: the family's τ is the base's tuned τ, so f_φ₀ is the base and
    # the residual is the family at φ. Started at plain CE instead (longtail100_warm_lr), 1%
    # less class weight makes the loss "adjusted CE − 1% of a CE": where the adjusted CE is
    # already satisfied and CE is not (a head class beaten only by a rare one), the loss falls
    # as the true class's logit falls, and Adam follows that small gradient (the README of
    # longtail100_warm_lr measures the damage: held-out balanced error 0.63 → 0.79)
    at_base = compose_cfg("meta", ["experiment=longtail100_warm_at_base"])
    at_ce = compose_cfg("meta", ["experiment=longtail100_warm_lr"])
    assert at_base.loss.start_at_base and at_base.loss.base_params != {}
    task = task_pool(at_base)[0]
    pred, target, ctx = _batch(task)
    tau = at_base.loss.base_params["tau"]
    head, rare = 0, int(task.class_counts.argmin())
    assert task.class_counts[head] == task.class_counts.max()
    rival = torch.linspace(-2.0, 8.0, 41)  # the rare class's logit; the head's is 0, others -30
    z = torch.full((len(rival), task.num_classes), -30.0)
    z[:, head], z[:, rare] = 0.0, rival
    y = torch.full((len(rival),), head)
    for cfg, never in ((at_base, True), (at_ce, False)):
        loss = instantiate_loss(cfg.loss, task)
        assert torch.allclose(
            loss(pred, target, **ctx), logit_adjusted_ce(pred, target, tau=tau, **ctx), atol=1e-5
        )
        with torch.no_grad():
            loss.family_loss.log_weight.sub_(0.01)  # 1% less weight on every class
        zz = z.clone().requires_grad_(True)
        loss(zz, y, **ctx).sum().backward()
        assert zz.grad is not None
        assert bool((zz.grad[:, head] < 0).all()) is never  # raising the true logit lowers it


def test_start_at_base_takes_the_base_s_effective_settings_or_refuses(compose_cfg, tmp_path):
    task = task_pool(compose_cfg("meta", ["experiment=longtail100_warm_at_base"]))[0]
    pred, target, ctx = _batch(task)

    def build(**kw):
        return Residual(num_classes=task.num_classes, start_at_base=True, **kw)

    # the tuned τ, or with no tuned.json (debug) the base's own default τ = 1: the start is
    # the base either way (with family_params: ${loss.base_params} it was plain CE then)
    for base_params, tau in (({"tau": 0.37}, 0.37), ({}, 1.0)):
        loss = build(base="logit_adjusted_ce", family="logit_adjusted", base_params=base_params)
        assert loss.family_loss.tau == tau
        expected = logit_adjusted_ce(pred, target, tau=tau, **ctx)
        assert torch.allclose(loss.family_loss(pred, target, **ctx), expected, atol=1e-6)
        back = load_learned_loss(save_learned_loss(loss, tmp_path / "r.pt"))
        assert torch.equal(back(pred, target, **ctx), loss(pred, target, **ctx))
    debug = compose_cfg("meta", ["experiment=longtail100_warm_at_base", "debug=default"])
    assert instantiate_loss(debug.loss, task).family_loss.tau == 1.0
    with pytest.raises(ValueError, match="takes none of loss.base = 'logit_adjusted_ce'"):
        build(base="logit_adjusted_ce", family="taylorglo")
    with pytest.raises(ValueError, match="loss.family_params gives 0.2"):
        build(
            base="logit_adjusted_ce",
            family="logit_adjusted",
            base_params={"tau": 0.37},
            family_params={"tau": 0.2},
        )
    with pytest.raises(ValueError, match="must be true or false"):
        Residual(base="ce", family="taylorglo", start_at_base="yes")  # type: ignore[arg-type]


def test_start_at_base_refuses_a_family_that_is_not_the_base_at_those_settings(monkeypatch):
    from metaloss.losses.logit_adjusted import LogitAdjusted

    real = LogitAdjusted.forward
    monkeypatch.setattr(LogitAdjusted, "forward", lambda self, *a, **k: real(self, *a, **k) * 1.01)
    with pytest.raises(ValueError, match="is not 'logit_adjusted_ce' at its start"):
        Residual(
            base="logit_adjusted_ce", family="logit_adjusted", num_classes=4, start_at_base=True
        )

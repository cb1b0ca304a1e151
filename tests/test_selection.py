"""Held-out selection (meta.selection): the outer objective never reads the selection rows; the
learned loss is the kept φ that scores best on them; a resumed run chooses the same."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metaloss import selection
from metaloss.cli import meta as meta_app
from metaloss.losses.io import load_learned_loss
from metaloss.runtime import task_pool
from metaloss.validate import ConfigError, check_config

BASE = [
    "logger=none",
    "progress=false",
    "task=digits",
    "model.hidden=[16]",
    "optim=sgd",
    "meta.tasks_per_step=2",
    "meta.inner_steps=3",
    "meta_test.enabled=false",
    "loss=taylorglo",
    "meta.selection.frac=0.3",
    "meta.selection.every=2",
    "meta.checkpoint_every=1",
]


def test_the_selection_rows_are_held_out_of_what_the_search_reads(compose_cfg):
    task = task_pool(compose_cfg("meta", BASE))[0]
    fit, held = selection.split_validation(task, 0.3)
    rows = {tuple(r.flatten().tolist()) for r in task.x_val}
    fit_rows = {tuple(r.flatten().tolist()) for r in fit.x_val}
    held_rows = {tuple(r.flatten().tolist()) for r in held.x_val}
    assert not fit_rows & held_rows and fit_rows | held_rows == rows  # disjoint, covering
    n_classes = len(torch.unique(task.y_val))
    assert abs(len(held.x_val) - 0.3 * len(task.x_val)) <= n_classes  # per-class rounding
    assert set(held.y_val.tolist()) == set(task.y_val.tolist())  # stratified: every class held
    assert torch.equal(fit.x_train, task.x_train) and torch.equal(held.x_test, task.x_test)
    again, _ = selection.split_validation(task, 0.3)
    assert torch.equal(again.x_val, fit.x_val)  # fixed: a resumed run holds out the same rows


def test_the_lowest_selection_score_wins_and_a_diverged_phi_never_does():
    assert selection.choose({2: 0.5, 4: 0.3, 6: 0.4}) == 4
    assert selection.choose({2: 0.3, 4: 0.3}) == 4  # ties: the later φ
    assert selection.choose({2: math.nan, 4: 0.9}) == 4
    assert selection.choose({2: math.nan}) is None


def test_with_a_margin_the_start_is_left_only_for_a_phi_better_by_more_than_it():
    # noise_sym40_warm_lr, run 2: φ₀ 0.5825, a φ 0.5724 (3 of 297 row-seed predictions better)
    scores = {0: 0.5825, 5: 0.5926, 15: 0.5724, 40: 0.5859}
    assert selection.choose(scores) == 15
    assert selection.choose(scores, margin=0.005) == 15
    assert selection.choose(scores, margin=0.02) == 0
    assert selection.choose({0: 0.58, 15: 0.50}, margin=0.02) == 15
    assert selection.choose({0: 0.5, 15: 0.5}, margin=0.0) == 15  # ties: the later φ, as before
    # a diverged start is no anchor; with no start among the candidates the margin is moot
    assert selection.choose({0: math.nan, 15: 0.57}, margin=0.02) == 15
    assert selection.choose({5: 0.59, 15: 0.57}, margin=0.5) == 15


def test_the_learned_loss_is_the_chosen_phi_and_a_resumed_run_chooses_the_same(
    compose_cfg, tmp_path, monkeypatch
):
    real, seen = meta_app.sample_meta_batch, []

    def spy(tasks, *a, **k):  # the tasks the outer objective draws its validation batches from
        seen.extend(len(t.x_val) for t in tasks)
        return real(tasks, *a, **k)

    monkeypatch.setattr(meta_app, "sample_meta_batch", spy)
    task = task_pool(compose_cfg("meta", BASE))[0]
    n_fit = len(selection.split_validation(task, 0.3)[0].x_val)
    whole = tmp_path / "whole"
    out = meta_app.run(compose_cfg("meta", BASE + ["meta.steps=6"]), whole, "taylorglo")
    assert seen and set(seen) == {n_fit} and n_fit < len(task.x_val)  # never the held-out rows
    record = json.loads((whole / "selection.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [0, 2, 4, 6]  # φ₀ is one
    assert all(math.isfinite(c["selection"]) for c in record["candidates"])
    assert [c["logged_objective"] is None for c in record["candidates"]] == [True] + [False] * 3
    best = min(record["candidates"], key=lambda c: (c["selection"], -c["step"]))
    assert record["chosen_step"] == best["step"] == out["selection"]["chosen_step"]
    kept = torch.load(whole / "checkpoint.pt", weights_only=True)["snapshots"][best["step"]]
    loaded = load_learned_loss(whole / "learned_loss.pt")
    assert loaded.meta["steps"] == best["step"]  # the kept φ's own outer steps, not meta.steps
    saved = loaded.state_dict()
    assert all(torch.equal(saved[k.removeprefix("loss.")], v) for k, v in kept.items())
    split = tmp_path / "split"
    meta_app.run(compose_cfg("meta", BASE + ["meta.steps=4"]), split, "taylorglo")
    meta_app.run(compose_cfg("meta", BASE + ["meta.steps=6"]), split, "taylorglo")
    resumed = json.loads((split / "selection.json").read_text())
    assert resumed["chosen_step"] == record["chosen_step"]
    assert [c["selection"] for c in resumed["candidates"]] == [
        c["selection"] for c in record["candidates"]
    ]
    again = load_learned_loss(split / "learned_loss.pt").state_dict()
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_a_margin_no_candidate_clears_keeps_the_start_and_says_so(compose_cfg, tmp_path):
    out = tmp_path / "m"
    meta_app.run(compose_cfg("meta", BASE + ["meta.steps=4"]), out, "taylorglo")
    plain = json.loads((out / "selection.json").read_text())
    assert plain["margin"] == 0.0 and plain["chosen_step"] != 0  # a φ beat the start...
    # ...by less than 5: the same finished run, resumed with a margin, chooses again (the
    # margin is not part of the run's identity: it acts after training) and keeps φ₀
    meta_app.run(
        compose_cfg("meta", BASE + ["meta.steps=4", "meta.selection.margin=5"]), out, "taylorglo"
    )
    record = json.loads((out / "selection.json").read_text())
    assert record["margin"] == 5.0 and record["chosen_step"] == 0
    assert [c["selection"] for c in record["candidates"]] == [
        c["selection"] for c in plain["candidates"]
    ]
    start = torch.load(out / "checkpoint.pt", weights_only=True)["snapshots"][0]
    saved = load_learned_loss(out / "learned_loss.pt").state_dict()
    assert all(torch.equal(saved[k.removeprefix("loss.")], v) for k, v in start.items())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["meta.mode=online"], "meta.mode = 'online'"),
        (["meta.val_from_train=true"], "meta.val_from_train = true"),
        (["meta.selection.frac=1.0"], "meta.selection.frac"),
        (["meta.selection.margin=-0.01"], "meta.selection.margin"),
        (["meta.selection.margin=inf"], "meta.selection.margin"),
        (
            ["meta.selection.frac=0", "meta.selection.margin=0.02"],
            "held-out selection, which is off",
        ),
    ],
)
def test_selection_settings_that_cannot_work_are_refused(compose_cfg, extra, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg("meta", BASE + extra))

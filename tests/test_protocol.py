"""The comparison protocol (issue 16; docs/protocol.md): fresh data draws per meta-test seed
from a seed stream disjoint from training, a long-tail profile that keeps class identity
across draws, outer searches that honour `seed=`, and a record of the protocol each
comparison was made under."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from metaloss.cli import meta as meta_app
from metaloss.cli.comparison import tasks_for_seed_fn
from metaloss.tasks.base import TEST_TASK_SEEDS, meta_test_draws
from metaloss.validate import ConfigError, check_against_task


def test_each_meta_test_seed_draws_its_own_data_from_a_disjoint_seed_stream(compose_cfg):
    cfg = compose_cfg("meta", ["task=digits", "meta_test.seeds=3", "task.label_noise.rate=0.2"])
    assert cfg.meta_test.fresh_draws  # the default
    pool = [instantiate(cfg.task)]
    draws = [tasks_for_seed_fn(cfg, pool)(s)[0] for s in range(3)]
    # every draw differs from the training draw and from each other (split and noise draw)
    for i, d in enumerate(draws):
        assert not torch.equal(d.y_train, pool[0].y_train), i
        assert d.x_train.shape == pool[0].x_train.shape and d.num_classes == pool[0].num_classes
    assert not torch.equal(draws[0].x_train, draws[1].x_train)
    again = tasks_for_seed_fn(cfg, pool)(1)[0]
    assert torch.equal(again.x_train, draws[1].x_train) and torch.equal(
        again.y_train, draws[1].y_train
    )
    assert meta_test_draws(3, 1) == range(
        TEST_TASK_SEEDS, TEST_TASK_SEEDS + 9
    )  # 3 draws, 3 seeds each
    # fresh_draws=false: every seed on the training draw (the recorded experiments' protocol)
    same = compose_cfg("meta", ["task=digits", "meta_test.fresh_draws=false"])
    assert tasks_for_seed_fn(same, pool)(2)[0] is pool[0]


@pytest.mark.parametrize(
    "overrides, fresh",
    [
        (["task.seed=10001"], True),
        (["task.seed=9997"], True),
        (["task.seed=10001", "meta_test.fresh_draws=false"], False),
    ],
)
def test_a_training_draw_that_meets_the_test_draws_is_refused(compose_cfg, overrides, fresh):
    cfg = compose_cfg("meta", ["task=digits", "meta_test.seeds=5", *overrides])
    task = instantiate(cfg.task)
    if fresh and cfg.task.seed >= TEST_TASK_SEEDS:
        with pytest.raises(
            ConfigError, match=r"task.seed = 10001 .* meet the meta-test's draws 10000..10014"
        ):
            check_against_task(cfg, task)
    else:
        check_against_task(cfg, task)


def test_a_task_family_whose_training_tasks_reach_the_test_draws_is_refused(compose_cfg):
    cfg = compose_cfg("meta", ["task.seed=9990", "meta.train_tasks=20", "meta_test.seeds=2"])
    with pytest.raises(
        ConfigError,
        match=r"training draws' seeds 9990..10011 meet the meta-test's draws 10000..10005",
    ):
        check_against_task(cfg, instantiate(cfg.task))


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_the_long_tail_profile_keeps_class_identity_across_draws(compose_cfg):
    """profile=index (Cui et al. 2019): class 0 is the head and class 9 the tail on every draw.
    profile=rank (the default, what the recorded experiments used): head and tail are
    whichever classes happen to be most and least frequent in the drawn split."""
    heads, tails = {}, {}
    for profile in ("index", "rank"):
        for seed in (0, 1):
            cfg = compose_cfg(
                "meta",
                [
                    "task=mnist1d",
                    "task.imbalance_ratio=100",
                    f"task.seed={seed}",
                    f"+task.imbalance_profile={profile}",
                ],
            )
            counts = instantiate(cfg.task).class_counts
            heads[profile, seed], tails[profile, seed] = int(counts.argmax()), int(counts.argmin())
            assert counts.max() / counts.min() == pytest.approx(
                100, rel=0.25
            )  # integer tail counts
    assert (
        heads["index", 0] == heads["index", 1] == 0 and tails["index", 0] == tails["index", 1] == 9
    )
    assert (heads["rank", 0], tails["rank", 0]) != (heads["rank", 1], tails["rank", 1])


@pytest.mark.parametrize("group", ["meta_optim=cmaes", "hypergrad=es"])
def test_the_outer_search_follows_seed(compose_cfg, group):
    node = "meta_optim" if group.startswith("meta_optim") else "hypergrad"
    assert compose_cfg("meta", [group, "seed=3"])[node].seed == 3
    assert compose_cfg("meta", [group])[node].seed == 0


def test_the_comparison_records_its_protocol(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "meta",
        [
            "logger=none",
            "progress=false",
            "task=digits",
            "loss=taylorglo",
            "model.hidden=[8]",
            "meta.steps=2",
            "meta.tasks_per_step=2",
            "meta.inner_steps=3",
            "meta.inner_batch=32",
            "meta.val_batch=64",
            "compare=[ce,focal]",
            "meta_test.seeds=2",
            "meta_test.steps=5",
            "meta_test.batch_size=32",
        ],
    )
    meta_app.run(cfg, tmp_path, "taylorglo")
    protocol = json.loads((tmp_path / "comparison.json").read_text())["protocol"]
    assert protocol == {
        "meta_training_horizon": 3,
        "meta_test_steps": 5,
        "horizon_matched": False,
        "horizon_note": None,
        "fresh_draws": True,
        "untuned_baselines": ["ce", "focal"],
    }


@pytest.mark.parametrize("task", ["digits", "mnist1d"])  # unstandardised: rows compare across draws
def test_a_fresh_draw_of_a_finite_data_set_never_tests_on_a_training_example(compose_cfg, task):
    """A finite data set's test split is the same on every draw; only train/val are re-split.
    Checked by the rows themselves: no test row of any draw is a train or val row of the
    meta-training draw (before: ~75% of a fresh draw's test rows had been trained or validated
    on), and task.seed=0 is still the split metaloss always made."""
    cfg = compose_cfg("meta", [f"task={task}", "meta_test.seeds=2"])
    pool = [instantiate(cfg.task)]

    def rows(x):
        return {hash(r.numpy().tobytes()) for r in x.reshape(len(x), -1)}

    seen = rows(pool[0].x_train) | rows(pool[0].x_val)
    for s in range(2):
        draw = tasks_for_seed_fn(cfg, pool)(s)[0]
        assert not rows(draw.x_test) & seen, s
        assert not torch.equal(draw.x_val, pool[0].x_val), s  # a new split all the same


def test_three_way_split_keeps_the_test_examples_for_every_seed():
    """The split breast_cancer and diabetes use too (their rows are standardised per draw, so
    they are checked here, on the raw data): same test indices, new train/val, no overlap."""
    from metaloss.tasks.base import three_way_split

    x = torch.arange(100.0)[:, None]
    y = torch.zeros(100, dtype=torch.long)
    (tr0, _), (va0, _), (te0, _) = three_way_split(x, y, val_frac=0.15, test_frac=0.25, seed=0)
    (tr1, _), (va1, _), (te1, _) = three_way_split(x, y, val_frac=0.15, test_frac=0.25, seed=10001)
    assert torch.equal(te0, te1) and not torch.equal(va0, va1)
    assert not set(te1.flatten().tolist()) & set(torch.cat([tr0, va0]).flatten().tolist())
    assert sorted(torch.cat([tr1, va1, te1]).flatten().tolist()) == list(range(100))


def test_fresh_draws_of_a_long_tail_ranked_by_frequency_are_refused(compose_cfg):
    """profile=rank (the default: what the recorded experiments used) re-ranks the classes on
    every draw; with fresh draws a per-class loss would mean other classes on each, so the run
    must choose: index, or one draw."""
    base = ["task=digits", "task.imbalance_ratio=10"]
    cfg = compose_cfg("meta", base)
    with pytest.raises(
        ConfigError, match=r"task.imbalance_profile = 'rank' with meta_test.fresh_draws = true"
    ):
        check_against_task(cfg, instantiate(cfg.task))
    for fix in (["+task.imbalance_profile=index"], ["meta_test.fresh_draws=false"]):
        cfg = compose_cfg("meta", base + fix)
        check_against_task(cfg, instantiate(cfg.task))


def test_a_training_draw_whose_noise_seed_is_a_test_draws_split_seed_is_refused(compose_cfg):
    """task.seed=9999 splits with 9999 but draws its imbalance with 10000 and its noise with
    10001: the first test draw's own seeds."""
    cfg = compose_cfg("meta", ["task=digits", "task.seed=9999"])
    with pytest.raises(ConfigError, match=r"task.seed = 9999 .* seeds 9999..10001 meet"):
        check_against_task(cfg, instantiate(cfg.task))


def test_the_meta_test_trains_for_the_meta_training_horizon_by_default(compose_cfg):
    """Matched horizons are the default (issue 16): meta_test.steps follows meta.inner_steps
    unless a config sets it (and a record then states why, meta_test.horizon_note)."""
    assert compose_cfg("meta", [])["meta_test"].steps == compose_cfg("meta", [])["meta"].inner_steps
    assert compose_cfg("meta", ["meta.inner_steps=7"]).meta_test.steps == 7
    assert compose_cfg("meta", ["meta.inner_steps=7", "meta_test.steps=30"]).meta_test.steps == 30
    assert compose_cfg("tune", ["meta.inner_steps=9"]).meta_test.steps == 9

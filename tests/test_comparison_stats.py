"""The meta-test comparison never loses or bends a result: diverged seeds stay as NaN,
comparison.json is always written, NaN baselines are never "best", the paired t-test
and its interval match scipy, and NaNs make a verdict "undefined", never "no difference"."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy import stats

from metaloss.cli.comparison import format_verdict, run_meta_test
from metaloss.cli.logger import NullLogger
from metaloss.losses import fixed
from metaloss.metatest import compare_losses, paired, significance, welch
from metaloss.metrics import train_result_names
from metaloss.report import collect, format_table, jsonable, summarize
from metaloss.runtime import task_pool
from metaloss.tasks.regression import sine

NAN = float("nan")


def linear(in_shape, out_dim):
    return torch.nn.Linear(in_shape[0], out_dim)


def sgd(params):
    return torch.optim.SGD(params, lr=0.01)


def _tasks(wide_seeds=(), wide_task=0, per_seed=1):
    """Sine tasks; on ``wide_seeds`` task ``wide_task`` has x in ±500, where SGD at lr 0.01
    on MSE diverges (curvature ~2 E[x²]) while MAE's bounded gradient does not."""

    def for_seed(seed):
        return [
            sine(
                seed=100 * seed + i,
                n_train=32,
                n_val=16,
                n_test=16,
                x_range=(-500.0, 500.0) if seed in wide_seeds and i == wide_task else (-5.0, 5.0),
            )
            for i in range(per_seed)
        ]

    return for_seed


def _strict(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- compare_losses


def test_a_seed_whose_only_task_diverged_is_kept_as_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="metaloss"):
        res = compare_losses(
            _tasks(wide_seeds={1}),
            linear,
            {"mse": fixed.mse, "mae": fixed.mae},
            sgd,
            seeds=[0, 1, 2],
            steps=30,
            batch_size=None,
            progress=False,
        )
    keys = train_result_names("regression")
    for name in ("mse", "mae"):
        assert list(res[name]) == keys  # same keys for every loss, from the task kind
        assert all(len(v) == 3 for v in res[name].values())  # n stays len(seeds)
    assert all(math.isnan(v[1]) for v in res["mse"].values())
    assert all(math.isfinite(v[0]) and math.isfinite(v[2]) for v in res["mse"].values())
    assert all(math.isfinite(x) for v in res["mae"].values() for x in v)
    assert "'mse' on seed 1 task 0" in caplog.text and "NaN" in caplog.text


def test_a_partially_diverged_seed_is_nan_not_the_mean_of_the_survivors(caplog):
    with caplog.at_level(logging.WARNING, logger="metaloss"):
        res = compare_losses(
            _tasks(wide_seeds={0}, wide_task=1, per_seed=2),
            linear,
            {"mse": fixed.mse},
            sgd,
            seeds=[0, 1],
            steps=30,
            batch_size=None,
            progress=False,
        )
    assert math.isnan(res["mse"]["test/mse"][0]) and math.isfinite(res["mse"]["test/mse"][1])
    assert "1/2 tasks diverged" in caplog.text


def test_a_loss_that_always_diverges_still_has_every_key():
    def nan_loss(pred, target, **_):
        return torch.full((pred.shape[0],), NAN)

    res = compare_losses(
        _tasks(),
        linear,
        {"mse": fixed.mse, "nan": nan_loss},
        sgd,
        seeds=[0, 1],
        steps=3,
        batch_size=None,
        progress=False,
    )
    assert list(res["nan"]) == list(res["mse"]) == train_result_names("regression")
    assert all(len(v) == 2 and all(math.isnan(x) for x in v) for v in res["nan"].values())
    sig = significance({"learned": res["nan"], "mse": res["mse"]}, "test/mse")
    assert sig["verdict"] == "undefined: learned loss diverged on 2/2 seeds"


# ---------------------------------------------------------------- significance

A = [0.50, 0.42, 0.61, 0.55, 0.47]  # learned, per seed (test/mse: lower is better)
B = [0.58, 0.49, 0.63, 0.66, 0.52]  # a baseline: worse on every seed, large seed-to-seed spread


def test_paired_statistics_match_scipy_on_known_numbers():
    ref = stats.ttest_rel(A, B)
    out = paired(A, B)
    d = np.subtract(A, B)
    assert out["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (out["ci_low"], out["ci_high"]) == (
        pytest.approx(ci.low, rel=1e-10),
        pytest.approx(ci.high, rel=1e-10),
    )
    assert out["mean_difference"] == pytest.approx(-0.066)
    assert out["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert welch(A, B) == pytest.approx(stats.ttest_ind(A, B, equal_var=False).pvalue)


def test_the_paired_test_decides_and_welch_is_reported():
    sig = significance(
        {"learned": {"test/mse": A}, "mse": {"test/mse": B}, "mae": {"test/mse": [0.9] * 5}},
        "test/mse",
    )
    assert sig["best_baseline"] == "mse" and "paired" in sig["test"]
    assert sig["p_value"] < 0.05 < sig["p_value_welch"]  # the pairing is what detects it
    assert sig["verdict"] == "significantly better"
    assert sig["ci_low"] < sig["difference"] < sig["ci_high"] < 0 and sig["ci_level"] == 0.95
    line = format_verdict(sig)
    for part in ("paired t p = ", "Welch p = ", "95% CI", "d_z", "significantly better", "(mse)"):
        assert part in line, part


def test_the_interval_covers_the_true_difference():
    rng = np.random.default_rng(0)
    delta, n, reps, hits = -0.3, 5, 400, 0
    for _ in range(reps):
        seed_effect = rng.normal(0, 1.0, n)  # shared data and init: a big common term
        ours = seed_effect + delta + rng.normal(0, 0.2, n)
        theirs = seed_effect + rng.normal(0, 0.2, n)
        out = paired(ours, theirs)
        hits += out["ci_low"] <= delta <= out["ci_high"]
    assert 0.92 <= hits / reps <= 0.98


def test_a_diverged_baseline_is_never_best():
    res = {
        "learned": {"test/mse": [1.0, 1.1, 1.2]},
        "ok": {"test/mse": [1.5, 1.6, 1.4]},
        "bad": {"test/mse": [0.1, NAN, 0.1]},
    }  # the lowest mean over its surviving seeds
    sig = significance(res, "test/mse")
    assert sig["best_baseline"] == "ok" and sig["diverged_baselines"] == {"bad": 1}
    sig = significance({**res, "ok": {"test/mse": [1.5, math.inf, 1.4]}}, "test/mse")
    assert sig["best_baseline"] is None and math.isnan(sig["p_value"])
    assert sig["verdict"] == "undefined: every baseline diverged on some seed (ok 1/3, bad 1/3)"


@pytest.mark.parametrize("ours", [[0.5, NAN, 0.4, NAN, 0.45], [NAN] * 5])
def test_nans_in_the_learned_loss_make_the_verdict_undefined(ours):
    sig = significance(
        {"learned": {"test/acc": ours}, "ce": {"test/acc": [0.6, 0.5, 0.55, 0.6, 0.5]}}, "test/acc"
    )
    bad = sum(math.isnan(x) for x in ours)
    assert sig["verdict"] == f"undefined: learned loss diverged on {bad}/5 seeds"
    assert (
        math.isnan(sig["p_value"])
        and math.isnan(sig["p_value_welch"])
        and math.isnan(sig["difference"])
    )
    assert sig["learned_n_nan"] == bad and f"({bad}/5 NaN)" in format_verdict(sig)


def test_degenerate_cases_have_defined_values():
    same = paired([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert (
        same["p_value"] == 1.0
        and same["cohens_dz"] == 0.0
        and same["ci_low"] == same["ci_high"] == 0.0
    )
    shift = paired(
        [0.3, 0.4, 0.5], [0.4, 0.5, 0.6]
    )  # one constant difference: rounding-level spread
    assert (
        shift["p_value"] == 0.25 and shift["cohens_dz"] == -math.inf
    )  # exact sign-flip p: 2 / 2**3
    assert shift["mean_difference"] == pytest.approx(-0.1)
    one = significance({"learned": {"test/mse": [0.3]}, "mse": {"test/mse": [0.4]}}, "test/mse")
    assert one["verdict"] == "undefined: a paired t-test needs at least 2 seeds, got 1"
    assert one["difference"] == pytest.approx(-0.1) and math.isnan(one["p_value"])
    assert (
        significance({"learned": {"test/mse": [0.3, 0.4]}}, "test/mse")["verdict"]
        == "undefined: no baseline to compare with"
    )
    with pytest.raises(ValueError, match="cannot pair seeds"):
        significance({"learned": {"test/mse": [0.3, 0.4]}, "mse": {"test/mse": [0.3]}}, "test/mse")


# ---------------------------------------------------------------- report


def test_summary_and_table_are_nan_aware():
    groups = {
        "a": {"test/mse": [0.10, NAN, 0.12], "val/mse": [1.0, 1.0, 1.0]},
        "b": {"test/mse": [0.20, 0.21, 0.19]},
        "c": {"test/mse": [NAN, NAN, NAN]},
    }
    s = summarize(groups)
    assert s["a"]["test/mse"] == {
        "mean": pytest.approx(0.11),
        "std": pytest.approx(np.std([0.1, 0.12], ddof=1)),
        "n": 3,
        "n_nan": 1,
    }
    assert s["c"]["test/mse"]["n_nan"] == 3 and math.isnan(s["c"]["test/mse"]["mean"])
    table = format_table(s)
    assert "| a | 3 | 0.1100 ± 0.0141 (1/3 NaN) |" in table  # lower mean, but not bold
    assert "**0.2000 ± 0.0100**" in table and "| c | 3 | NaN (3/3 NaN) |" in table
    assert _strict(json.dumps(jsonable(s)))["c"]["test/mse"]["mean"] is None


def test_null_in_result_files_reads_back_as_nan(tmp_path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "comparison.json").write_text(
        json.dumps(
            jsonable(
                {"results": {"learned": {"test/mse": [0.1, NAN]}, "mse": {"test/mse": [0.2, 0.3]}}}
            )
        )
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"loss": "mae", "metrics": {"test/mse": null}}')
    groups = collect(tmp_path)
    assert groups["learned"]["test/mse"][0] == 0.1 and math.isnan(groups["learned"]["test/mse"][1])
    assert math.isnan(groups["mae"]["test/mse"][0])


# ---------------------------------------------------------------- run_meta_test

TINY = [
    "logger=none",
    "progress=false",
    "meta.steps=1",
    "meta_test.seeds=2",
    "meta_test.steps=5",
    "meta_test.tasks_per_seed=1",
    "model.hidden=[8]",
    "loss.hidden=[8]",
]


def test_a_learned_loss_that_diverges_everywhere_still_writes_comparison_json(
    compose_cfg, tmp_path, caplog
):
    cfg = compose_cfg("meta", TINY)
    learned = instantiate(cfg.loss).requires_grad_(False)
    for p in learned.parameters():
        p.fill_(NAN)  # a learned loss gone bad: NaN for every input
    with caplog.at_level(logging.WARNING, logger="metaloss"):
        out = run_meta_test(
            cfg, learned, task_pool(cfg), instantiate(cfg.optim), tmp_path, NullLogger()
        )
    comp = _strict((tmp_path / "comparison.json").read_text())  # strict JSON: NaN written as null
    assert set(comp["results"]) == {"learned", "mse", "mae", "huber"}
    assert all(v == [None, None] for v in comp["results"]["learned"].values())
    assert comp["significance"]["verdict"] == "undefined: learned loss diverged on 2/2 seeds"
    assert comp["significance"]["p_value"] is None
    assert comp["significance"]["best_baseline"] in {"mse", "mae", "huber"}
    assert out["significance"]["verdict"] == comp["significance"]["verdict"]
    md = (tmp_path / "comparison.md").read_text()
    assert "NaN (2/2 NaN)" in md and "undefined" in md
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "learned_vs_baselines.png" in caplog.text  # left out of the loss picture, said so
    assert math.isnan(summarize(collect(tmp_path))["learned"]["test/mse"]["mean"])


def test_a_wrong_metric_is_refused_before_training(compose_cfg, tmp_path):
    cfg = compose_cfg("meta", TINY + ["meta_test.metric=test/acc"])
    with pytest.raises(ValueError, match="not a metric of a regression task"):
        run_meta_test(
            cfg, fixed.mse, task_pool(cfg), instantiate(cfg.optim), tmp_path, NullLogger()
        )
    assert not (tmp_path / "comparison.json").exists()


def test_report_keeps_meta_tests_of_different_runs_apart_and_names_bad_files(tmp_path):
    import json as _json

    from metaloss.report import UnreadableResult, collect

    for name, val in (("a", 0.5), ("b", 0.7)):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            f"- loss={'ml3' if name == 'a' else 'poly_n'}\n"
        )
        (d / "comparison.json").write_text(
            _json.dumps(
                {"results": {"learned": {"test/acc": [val, val]}, "ce": {"test/acc": [0.6, 0.6]}}}
            )
        )
    groups = collect(tmp_path)
    assert groups["loss=ml3 | learned"]["test/acc"] == [0.5, 0.5]
    assert groups["loss=poly_n | learned"]["test/acc"] == [0.7, 0.7]
    assert groups["loss=ml3 | ce"]["test/acc"] == [0.6, 0.6]  # never counted twice under one name
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "comparison.json").write_text('{"results": {"learned": ')
    with pytest.raises(UnreadableResult, match="c/comparison.json: not readable JSON"):
        collect(tmp_path)


def test_report_keeps_a_seeds_run_apart_from_single_runs(tmp_path):
    import json as _json

    from metaloss.report import collect

    for name, overrides, rec in (
        ("single", "- seed=0\n- loss=mse\n", {"metrics": {"test/mse": 1.0}}),
        (
            "many",
            "- seeds=3\n- seed=0\n- loss=mse\n",
            {"runs": [{"seed": s, "metrics": {"test/mse": 2.0 + s}} for s in range(3)]},
        ),
    ):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(overrides)
        (d / "metrics.json").write_text(_json.dumps(rec))
    groups = collect(tmp_path)
    assert groups["seeds=3"]["test/mse"] == [2.0, 3.0, 4.0]  # `seeds` is a setting, `seed` is not
    others = [g for g in groups if g != "seeds=3"]
    assert len(others) == 1 and groups[others[0]]["test/mse"] == [
        1.0
    ]  # not pooled with the 3-seed run


def test_report_marks_debug_runs(tmp_path):
    import json as _json

    from metaloss.report import collect

    d = tmp_path / "run"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- debug=fast_dev_run\n- task=outliers\n")
    (d / "metrics.json").write_text(_json.dumps({"loss": "mse", "metrics": {"test/mse": 1.0}}))
    assert list(collect(tmp_path)) == ["debug=fast_dev_run"]  # never shown as a plain "mse" row


def _null_draws(reps: int, n: int = 5, k: int = 4, seed: int = 0):
    """Meta-test results with every loss truly equal: a per-seed effect shared by all losses
    (data, initialisation) and a per-(loss, seed) model quality shared by its validation and
    test values (a model good on validation tends to be good on test), plus split noise."""
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        seed_effect = rng.normal(0.7, 0.05, n)
        out = {}
        for name in ["learned", *(f"b{j}" for j in range(k))]:
            quality = rng.normal(0, 0.02, n)
            out[name] = {
                "val/acc": list(seed_effect + quality + rng.normal(0, 0.01, n)),
                "test/acc": list(seed_effect + quality + rng.normal(0, 0.01, n)),
            }
        yield out


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_under_the_null_each_verdict_direction_stays_at_its_nominal_rate():
    """All losses equal, 4 baselines, 5 seeds, 3000 draws: with the reference chosen on
    validation and the paired p Holm-adjusted over the baselines, "significantly worse" and
    "significantly better" each come out at most alpha/2 = 2.5% (+3 standard errors). The old
    rule (best baseline picked on the *test* mean, its p uncorrected) inflates "worse" well
    past 2.5% on the same draws, so this simulation can tell the two apart."""
    reps, verdicts, old_worse = 3000, {"significantly worse": 0, "significantly better": 0}, 0
    for res in _null_draws(reps):
        sig = significance(res, "test/acc")
        assert sig["selected_on"] == "val/acc"
        if sig["verdict"] in verdicts:
            verdicts[sig["verdict"]] += 1
        old = significance(res, "test/acc", select_on="test/acc")
        old_worse += old["p_value"] < 0.05 and old["difference"] < 0
    bound = 0.025 + 3 * math.sqrt(0.025 * 0.975 / reps)
    assert verdicts["significantly worse"] / reps <= bound, verdicts
    assert verdicts["significantly better"] / reps <= bound, verdicts
    assert old_worse / reps > 0.05, old_worse / reps


def test_the_reference_is_chosen_on_validation_and_every_baseline_is_reported():
    res = {
        "learned": {"val/acc": [0.5, 0.6, 0.55], "test/acc": [0.50, 0.61, 0.56]},
        "a": {"val/acc": [0.7, 0.7, 0.7], "test/acc": [0.40, 0.42, 0.41]},  # best on validation
        "b": {"val/acc": [0.6, 0.6, 0.6], "test/acc": [0.90, 0.91, 0.92]},
    }  # best on test
    sig = significance(res, "test/acc")
    assert sig["best_baseline"] == "a" and sig["selected_on"] == "val/acc"
    assert set(sig["pairwise"]) == {"a", "b"}
    assert sig["p_value_holm"] >= sig["p_value"] and "Holm" in sig["verdict_rule"]
    assert "chosen on val/acc" in format_verdict(sig) and "vs b:" in format_verdict(sig)


def test_meta_tests_of_several_meta_training_runs_count_each_run_once(tmp_path):
    """`metaloss-meta -m seed=0,1,2`: three meta-training runs, each meta-tested on the same 5
    test seeds. The report pools them per loss with one value per run (its mean over its test
    seeds): n = 3 independent units, the spread across meta-training runs (before: the runs
    were pooled value by value, n = 15, as ml3_sine/seeds/report.md shows n = 25)."""
    import json as _json

    from metaloss.report import collect, summarize

    for s, vals in enumerate(
        ([0.5, 0.6, 0.7, 0.5, 0.6], [0.2, 0.3, 0.2, 0.3, 0.2], [0.9, 0.8, 0.9, 0.8, 0.9])
    ):
        d = tmp_path / f"{s}_seed={s}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- seed={s}\n- loss=ml3\n")
        (d / "comparison.json").write_text(
            _json.dumps(
                {"results": {"learned": {"test/acc": vals}, "ce": {"test/acc": [0.6] * 4 + [None]}}}
            )
        )
    groups = collect(tmp_path)
    assert groups["learned"]["test/acc"] == pytest.approx([0.58, 0.24, 0.86])
    assert len(groups["ce"]["test/acc"]) == 3 and all(
        math.isnan(v) for v in groups["ce"]["test/acc"]
    )
    s = summarize(groups)["learned"]["test/acc"]
    assert s["n"] == 3 and s["std"] == pytest.approx(np.std([0.58, 0.24, 0.86], ddof=1))


def test_holm_on_known_values():
    """Holm (1979) step-down: the i-th smallest of k p-values times (k - i), running maximum,
    capped at 1 — checked against values worked by hand."""
    from metaloss.metatest import holm

    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}) == pytest.approx(
        {"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5}
    )
    assert holm({"a": 0.3, "b": 0.4}) == pytest.approx(
        {"a": 0.6, "b": 0.6}
    )  # monotone, then capped below 1
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert holm({"only": 0.02}) == {"only": 0.02}
    # significant alone (p = 0.02 < 0.05), not after correcting for 4 baselines
    res = {
        "learned": {"val/acc": [0.5] * 3, "test/acc": [0.50, 0.56, 0.50]},
        **{
            f"b{j}": {"val/acc": [0.6 - 0.01 * j] * 3, "test/acc": [0.60, 0.61, 0.61]}
            for j in range(4)
        },
    }
    sig = significance(res, "test/acc")
    assert (
        sig["p_value"] < 0.05 <= sig["p_value_holm"]
        and sig["verdict"] == "no significant difference"
    )


def test_a_baseline_without_finite_validation_values_stays_in_the_family():
    """Finite on test but NaN on validation: it cannot be chosen as the reference, but it is
    still compared (and counted by Holm) and named, never silently dropped."""
    res = {
        "learned": {"val/acc": [0.5, 0.5, 0.5], "test/acc": [0.50, 0.56, 0.50]},
        "a": {"val/acc": [0.7, NAN, 0.7], "test/acc": [0.80, 0.81, 0.82]},
        "b": {"val/acc": [0.6, 0.6, 0.6], "test/acc": [0.60, 0.61, 0.61]},
    }
    sig = significance(res, "test/acc")
    assert sig["best_baseline"] == "b" and sig["unselectable_baselines"] == ["a"]
    assert set(sig["pairwise"]) == {"a", "b"} and "2 comparisons" in sig["verdict_rule"]
    only = significance({"learned": res["learned"], "a": res["a"]}, "test/acc")
    assert (
        only["verdict"].startswith("undefined: no baseline has finite val/acc values")
        and "a diverged" in only["verdict"]
    )


def test_reruns_of_one_seed_are_not_pooled_as_independent_runs(tmp_path):
    import json as _json

    from metaloss.report import collect

    for name in ("first", "again"):  # the same command twice (a rerun after a crash)
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("- seed=0\n- loss=ml3\n")
        (d / "comparison.json").write_text(
            _json.dumps({"results": {"learned": {"test/acc": [0.5, 0.6]}}})
        )
    groups = collect(tmp_path)
    assert sorted(groups) == ["again | learned", "first | learned"]
    assert groups["first | learned"]["test/acc"] == [0.5, 0.6]

"""Repeated meta-training (issue 16): the search's verdict over meta-training runs x test
draws counts both sources of spread, holds its error rates under a simulated null where the
naive pooled test does not, reduces to the paired t-test for one run, and a record is only
combined from runs that are one experiment."""

import math

import numpy as np
import pytest

from metaloss.metatest import paired, significance
from metaloss.nested import combine, crossed, format_nested, nested_significance

METRIC = "test/acc"


def _runs(learned, baselines, val=None):
    """learned: M x S; baselines: {name: S values}; val: {name: S validation values}."""
    val = val or {}
    out = []
    for row in np.asarray(learned, float):
        r = {"learned": {METRIC: list(row), "val/acc": list(row)}}
        for b, v in baselines.items():
            r[b] = {METRIC: list(v), "val/acc": list(val.get(b, v))}
        out.append(r)
    return out


def test_one_run_is_exactly_the_paired_t_test():
    rng = np.random.default_rng(1)
    ours, theirs = rng.normal(size=6), rng.normal(size=6)
    mine = crossed((ours - theirs)[None, :])
    ref = paired(ours, theirs)
    for k in ("mean_difference", "ci_low", "ci_high", "p_value"):
        assert mine[k] == pytest.approx(ref[k], rel=1e-12)
    assert mine["df"] == 5
    runs = _runs([ours], {"b": theirs})
    assert nested_significance(runs, METRIC)["p_value"] == pytest.approx(
        significance(runs[0], METRIC)["p_value"]
    )


def test_the_standard_error_counts_the_spread_between_runs_and_between_draws():
    # two runs that differ by a constant: a run effect only; the naive pooled error would ignore it
    d = np.array([[1.0, 1.1, 0.9, 1.0], [3.0, 3.1, 2.9, 3.0]])
    out = crossed(d)
    m, s = d.shape
    ms_run = s * ((d.mean(1) - d.mean()) ** 2).sum() / (m - 1)
    ms_draw = m * ((d.mean(0) - d.mean()) ** 2).sum() / (s - 1)
    assert out["se"] == pytest.approx(math.sqrt((ms_run + ms_draw) / (m * s)))
    assert (
        out["se"] > d.std(ddof=1) / math.sqrt(d.size) * 1.5
    )  # wider than treating 8 cells as independent
    assert out["df"] < 2  # dominated by the run term, which has 1 degree of freedom


def test_constant_and_non_finite_tables():
    assert crossed(np.zeros((3, 4)))["p_value"] == 1.0
    const = crossed(np.full((3, 4), 0.01))
    assert const["p_value"] == pytest.approx(2 / 2**4) and const["se"] == 0.0
    bad = crossed(np.array([[0.1, np.nan], [0.2, 0.3]]))
    assert math.isnan(bad["p_value"]) and math.isnan(bad["mean_difference"])
    with pytest.raises(ValueError, match="M x S"):
        crossed(np.zeros(3))


def _null_rates(m, s, k, sd_run, sd_draw, sd_noise, reps, rng):
    """Fraction of simulated records, all losses truly equal, called worse / better; and the
    same for the naive test that pools the M x S differences as independent pairs."""
    worse = better = naive = 0
    for _ in range(reps):
        # a draw's difficulty (shared by every loss) cancels in the paired differences; what a
        # draw does to the learned loss alone (shared by every run) is the draw effect b_s
        common = rng.normal(size=s)
        baselines = {f"b{i}": common + rng.normal(size=s) * sd_noise for i in range(k)}
        val = {f"b{i}": rng.normal(size=s) for i in range(k)}
        learned = (
            (common + rng.normal(size=s) * sd_draw)[None, :]
            + rng.normal(size=(m, 1)) * sd_run
            + rng.normal(size=(m, s)) * sd_noise
        )
        sig = nested_significance(_runs(learned, baselines, val), METRIC)
        worse += sig["verdict"] == "significantly worse"
        better += sig["verdict"] == "significantly better"
        ref = baselines[sig["best_baseline"]]
        naive += paired(learned.ravel(), np.tile(ref, m))["p_value"] < 0.05 / k
    return worse / reps, better / reps, naive / reps


@pytest.mark.parametrize("sd_run,sd_draw", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_a_simulated_null_is_called_better_or_worse_at_most_at_the_nominal_rate(sd_run, sd_draw):
    rng = np.random.default_rng(7)
    worse, better, naive = _null_rates(3, 5, 4, sd_run, sd_draw, 0.3, reps=400, rng=rng)
    # nominal 2.5% per direction; 400 draws: a true 2.5% exceeds 4.5% with probability < 1%
    assert worse <= 0.045 and better <= 0.045, (worse, better)
    # pooling the 15 cells as independent pairs ignores the run effect and counts each draw 3
    # times: far above even a Bonferroni-corrected 5% (this is what the crossed test is for)
    assert naive > 0.1, naive


def test_the_reference_is_chosen_on_validation_and_diverged_baselines_are_left_out():
    rng = np.random.default_rng(3)
    learned = rng.normal(0.5, 0.01, size=(3, 5))
    baselines = {
        "good_val": np.full(5, 0.4) + rng.normal(0, 0.01, 5),
        "good_test": np.full(5, 0.6) + rng.normal(0, 0.01, 5),
        "nan": np.array([0.9, np.nan, 0.9, 0.9, 0.9]),
    }
    val = {"good_val": np.full(5, 0.9), "good_test": np.full(5, 0.1), "nan": np.full(5, 0.99)}
    sig = nested_significance(_runs(learned, baselines, val), METRIC)
    assert sig["best_baseline"] == "good_val" and sig["selected_on"] == "val/acc"
    assert sig["diverged_baselines"] == {"nan": 1} and set(sig["pairwise"]) == {
        "good_val",
        "good_test",
    }
    assert sig["verdict"] == "significantly better" and sig["n_meta_seeds"] == 3
    assert len(sig["per_run"]) == 3 and all(
        r["best_baseline"] == "good_val" for r in sig["per_run"]
    )
    assert sig["learned_between_runs_sd"] == pytest.approx(np.std(learned.mean(1), ddof=1))


def test_a_learned_loss_that_diverged_in_one_run_makes_the_verdict_undefined():
    learned = np.array([[0.5, 0.5, 0.6], [0.5, np.nan, 0.6]])
    sig = nested_significance(_runs(learned, {"b": [0.4, 0.4, 0.5]}), METRIC)
    assert sig["verdict"].startswith("undefined: learned loss diverged on 1/6")


def test_baselines_that_differ_between_runs_are_reported():
    runs = _runs([[0.5, 0.6], [0.5, 0.6]], {"b": [0.4, 0.5]})
    runs[1]["b"][METRIC] = [0.41, 0.5]
    sig = nested_significance(runs, METRIC)
    assert sig["baseline_spread_across_runs"] == pytest.approx(0.01)


def _comparison(learned, seeds=(0, 1, 2), task="t", protocol=None):
    return {
        "task": task,
        "metric": METRIC,
        "seeds": list(seeds),
        "protocol": protocol or {"fresh_draws": True},
        "results": {
            "learned": {METRIC: learned, "val/acc": learned},
            "ce": {METRIC: [0.4, 0.41, None], "val/acc": [0.4, 0.4, 0.4]},
        },
        "hyperparameters": {},
        "significance": {"alpha": 0.05},
    }


def test_combine_reads_null_as_nan_and_refuses_runs_that_are_not_one_record():
    rec = combine([_comparison([0.5, 0.6, 0.55]), _comparison([0.52, 0.58, 0.5])], [0, 1])
    assert rec["meta_seeds"] == [0, 1] and math.isnan(rec["baselines"]["ce"][METRIC][2])
    assert rec["significance"]["diverged_baselines"] == {"ce": 1}
    text = format_nested(rec)
    assert "learned, meta-seed 0" in text and "learned, meta-seed 1" in text and "2 × 3" in text
    with pytest.raises(ValueError, match="seeds"):
        combine([_comparison([0.5, 0.6, 0.55]), _comparison([0.5, 0.6], seeds=(0, 1))], [0, 1])
    with pytest.raises(ValueError, match="protocol"):
        combine(
            [
                _comparison([0.5, 0.6, 0.55]),
                _comparison([0.5, 0.6, 0.5], protocol={"fresh_draws": False}),
            ],
            [0, 1],
        )
    with pytest.raises(ValueError, match="distinct"):
        combine([_comparison([0.5, 0.6, 0.55])] * 2, [0, 0])


def test_an_interaction_alone_is_not_taken_for_equal_differences():
    """Rows and columns with equal means but cells that differ: the residual is the error,
    not a zero-variance table (which would give the sign-flip p and an empty interval)."""
    out = crossed(np.array([[1.0, -1.0], [-1.0, 1.0]]))
    assert out["mean_difference"] == 0 and out["p_value"] == pytest.approx(1.0) and out["se"] > 0
    shifted = crossed(np.array([[2.0, 0.0], [0.0, 2.0]]))
    assert shifted["ci_low"] < 1.0 < shifted["ci_high"] and shifted["p_value"] > 0.05


def test_one_draw_gives_no_verdict_and_one_run_says_what_it_is_about():
    one_draw = nested_significance(_runs([[0.5], [0.6], [0.55]], {"b": [0.4]}), METRIC)
    assert one_draw["verdict"].startswith("undefined: the test needs at least 2 test draws")
    one_run = nested_significance(_runs([[0.5, 0.6, 0.55]], {"b": [0.4, 0.41, 0.42]}), METRIC)
    assert "about that one learned loss" in one_run["verdict_rule"]
    assert (
        "about that one"
        not in nested_significance(_runs([[0.5, 0.6], [0.5, 0.7]], {"b": [0.4, 0.4]}), METRIC)[
            "verdict_rule"
        ]
    )


def test_a_tie_on_validation_goes_to_the_first_baseline_listed_not_to_the_last_float_bit():
    """mnist1d_clean's CE and focal have the same validation scores on one draw set; their float
    means differed by 1e-8 of summation order, which decided the reference. Equal to
    TIE_DIGITS decimals is a tie, and a tie goes to the first baseline in the compare list, in
    the one-run test and the nested one alike."""
    from metaloss.metatest import TIE_DIGITS, choose_reference

    tiny = 10.0 ** -(TIE_DIGITS + 2)
    assert choose_reference({"ce": 0.6556, "focal": 0.6556 + tiny}, higher=True) == "ce"
    assert choose_reference({"focal": 0.6556 + tiny, "ce": 0.6556}, higher=True) == "focal"
    assert choose_reference({"ce": 0.6556, "focal": 0.6557}, higher=True) == "focal"
    assert choose_reference({"mse": 0.2, "mae": 0.2 - tiny}, higher=False) == "mse"
    assert choose_reference({}, higher=True) is None
    rng = np.random.default_rng(0)
    learned = rng.normal(0.5, 0.01, size=(2, 5))
    tests = {"ce": np.full(5, 0.45), "focal": np.full(5, 0.47)}
    val = {"ce": np.full(5, 0.6556), "focal": np.full(5, 0.6556) + tiny}
    sig = nested_significance(_runs(learned, tests, val), METRIC)
    assert sig["best_baseline"] == "ce"
    assert all(r["best_baseline"] == "ce" for r in sig["per_run"])

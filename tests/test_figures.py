"""The figure style (metaloss.figures) and the loss-shape plot: PNG and PDF, per-seed points,
means with 95% intervals, significance marks, diverged seeds marked; shapes and gradients."""

import math

import pytest
import torch

from metaloss.figures import comparison_figure, mean_ci, stars
from metaloss.losses import fixed
from metaloss.plots import _gradients, plot_losses


def test_mean_ci_is_the_student_t_interval():
    from scipy import stats

    mean, half, n = mean_ci([1.0, 2.0, 4.0, float("nan")])
    assert n == 3 and mean == pytest.approx(7 / 3)
    sd = torch.tensor([1.0, 2.0, 4.0]).std().item()
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert stars(0.0004) == "***" and stars(0.004) == "**" and stars(0.04) == "*"
    assert stars(0.2) == "n.s." and stars(float("nan")) == ""


def test_comparison_figure_writes_png_and_pdf_with_marks(tmp_path):
    import matplotlib.pyplot as plt

    results = {
        "learned": {"test/acc": [0.8, 0.9, None], "test/f1": [0.7, 0.8, 0.75]},
        "ce": {"test/acc": [0.6, 0.62, 0.61], "test/f1": [0.5, 0.55, 0.52]},
        "focal|x": {"test/acc": [0.7, 0.71, 0.69], "test/f1": [0.6, 0.6, 0.61]},
    }
    sig = {
        "metric": "test/acc",
        "best_baseline": "focal|x",
        "higher_is_better": True,
        "pairwise": {
            "ce": {"difference": 0.2, "p_value_holm": 0.004},
            "focal|x": {"difference": 0.1, "p_value_holm": 0.3},
        },
    }
    before = plt.rcParams["font.size"]
    paths = comparison_figure(results, tmp_path / "cmp.png", significance=sig)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(
        p.stat().st_size > 1000 for p in paths
    )
    assert plt.rcParams["font.size"] == before  # the style does not leak
    texts = []

    import matplotlib

    real_savefig = matplotlib.figure.Figure.savefig

    def capture(fig, *a, **k):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        texts.extend(t.get_text() for ax in fig.axes for t in ax.get_yticklabels())
        return real_savefig(fig, *a, **k)

    matplotlib.figure.Figure.savefig = capture
    try:
        comparison_figure(results, tmp_path / "again.png", significance=sig)
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
    assert "** learned better" in texts and "n.s." in texts
    assert "1/3 diverged" in texts and "focal|x (ref.)" in texts


def test_loss_shapes_have_a_gradient_panel_that_is_the_derivative(tmp_path):
    grads = _gradients({"mse": fixed.mse, "mae": fixed.mae}, "regression", None, None, n=5)
    x = torch.linspace(-3, 3, 5)
    torch.testing.assert_close(grads["mse"], 2 * x)  # d (ŷ - 0)^2 / dŷ
    torch.testing.assert_close(grads["mae"], torch.sign(x))
    ce = _gradients({"ce": fixed.ce}, "classification", 4, None, n=5)["ce"]
    p = torch.linspace(0.005, 0.995, 5)
    torch.testing.assert_close(ce, p - 1, atol=1e-5, rtol=1e-5)  # d CE / d z_true = p_true - 1
    out = plot_losses({"learned": fixed.huber, "mse": fixed.mse}, "regression", tmp_path / "s.png")
    assert out.is_file() and (tmp_path / "s.pdf").is_file()

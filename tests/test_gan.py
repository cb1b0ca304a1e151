"""GAN losses (issue 20): the fixed losses against their formulas, WGAN-GP's penalty against a
hand computation, the two-player loop (one optimizer per player, d_steps), the measures, the
learned family's warm start and the CMA-ES search, and the record script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaloss.gan.losses import FIXED, GANLoss, LearnedGANLoss, gradient_penalty
from metaloss.gan.train import (
    Budget,
    frechet_distance,
    measures,
    ring_means,
    sample_ring,
    search,
    train_gan,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = Budget(steps=4, batch=16, z_dim=4, hidden=8, samples=64)
LOG2 = math.log(2.0)


def test_fixed_losses_match_their_formulas():
    r, f = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    sp = torch.nn.functional.softplus
    expect = {
        "minimax": (sp(-r) + sp(f), -sp(f)),
        "non_saturating": (sp(-r) + sp(f), sp(-f)),
        "hinge": (torch.tensor([1.0 + 1.0, 0.0 + 0.0]), -f),
        "least_squares": (0.5 * (r - 1) ** 2 + 0.5 * f**2, 0.5 * (f - 1) ** 2),
        "wgan_gp": (f - r, -f),
    }
    for name, (d, g) in expect.items():
        torch.testing.assert_close(FIXED[name].discriminator(r, f), d, msg=name)
        torch.testing.assert_close(FIXED[name].generator(f), g, msg=name)
    # the standard GAN's discriminator at D = 1/2 on both: 2 log 2
    assert FIXED["non_saturating"].discriminator(r[:1], f[:1]).item() == pytest.approx(2 * LOG2)
    assert FIXED["wgan_gp"].d_steps == 5 and FIXED["wgan_gp"].gp_weight == 10.0


def test_gradient_penalty_matches_a_hand_computation():
    """D(x) = Σ x²: ∇D(x̂) = 2 x̂ at x̂ = ε x + (1 - ε) x̃, penalty (‖2 x̂‖ - 1)²."""

    class Square(torch.nn.Module):
        def forward(self, x):
            return (x**2).sum(-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    eps = torch.rand(5, 1, generator=torch.Generator().manual_seed(3))
    x_hat = eps * real + (1 - eps) * fake
    expect = ((2 * x_hat).norm(dim=-1) - 1) ** 2
    got = gradient_penalty(Square(), real, fake, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expect)
    lin = torch.nn.Linear(2, 1)  # a linear critic: ∇ = w everywhere
    got = gradient_penalty(lin, real, fake, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, (lin.weight.norm() - 1).pow(2).expand(5).detach())


def test_the_learned_family_starts_at_non_saturating_and_holds_hinge_and_least_squares():
    r, f = torch.randn(7), torch.randn(7)
    learned = LearnedGANLoss()
    ns = FIXED["non_saturating"]
    assert torch.equal(learned.discriminator(r, f), ns.discriminator(r, f))
    assert torch.equal(learned.generator(f), ns.generator(f))
    with torch.no_grad():
        learned.d_real.copy_(torch.tensor([0.0, 1.0, 0.0]))
        learned.d_fake.copy_(torch.tensor([0.0, 1.0, 0.0]))
        learned.g_fake.copy_(torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(learned.discriminator(r, f), FIXED["hinge"].discriminator(r, f))
    torch.testing.assert_close(learned.generator(f), FIXED["hinge"].generator(f))
    with torch.no_grad():
        for p in (learned.d_real, learned.d_fake, learned.g_fake):
            p.copy_(torch.tensor([0.0, 0.0, 1.0]))
    ls = FIXED["least_squares"]
    torch.testing.assert_close(learned.discriminator(r, f), ls.discriminator(r, f))
    torch.testing.assert_close(learned.generator(f), ls.generator(f))


def test_measures_of_the_ring_itself_and_of_a_diverged_generator():
    g = torch.Generator().manual_seed(0)
    real, again = sample_ring(4000, g), sample_ring(4000, g)
    m = measures(again, real)
    assert m["modes"] == 8 and m["high_quality"] > 0.98 and m["frechet"] < 0.01
    one_mode = ring_means()[0] + 0.02 * torch.randn(4000, 2, generator=g)
    m1 = measures(one_mode, real)
    assert m1["modes"] == 1 and m1["frechet"] > 1.0
    assert all(math.isnan(v) for v in measures(torch.full((5, 2), math.nan), real).values())
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


def test_two_players_two_optimizers_and_d_steps_per_generator_step():
    calls = {"d": 0, "g": 0}

    def d_loss(r, f):
        calls["d"] += 1
        return torch.nn.functional.softplus(-r) + torch.nn.functional.softplus(f)

    def g_loss(f):
        calls["g"] += 1
        return torch.nn.functional.softplus(-f)

    out = train_gan(GANLoss("counted", d_loss, g_loss, d_steps=3), TINY, lr=1e-3, seed=0)
    assert calls == {"d": 3 * TINY.steps, "g": TINY.steps}
    assert set(out) == {
        "modes",
        "high_quality",
        "frechet",
        "val_modes",
        "val_high_quality",
        "val_frechet",
    }
    again = train_gan(GANLoss("counted", d_loss, g_loss, d_steps=3), TINY, lr=1e-3, seed=0)
    assert again == out  # a seed fixes players, data and noise
    with pytest.raises(ValueError, match="gan lr"):
        train_gan(FIXED["hinge"], TINY, lr=0.0, seed=0)
    with pytest.raises(ValueError, match="task.steps"):
        Budget(steps=0)


@pytest.mark.slow
def test_wgan_gp_and_a_diverging_loss_run_through_the_loop():
    assert math.isfinite(train_gan(FIXED["wgan_gp"], TINY, lr=1e-3, seed=1)["frechet"])
    broken = GANLoss("broken", lambda r, f: r * math.inf, lambda f: f)
    assert all(math.isnan(v) for v in train_gan(broken, TINY, lr=1e-3, seed=1).values())


@pytest.mark.slow
def test_cma_es_moves_the_learned_gan_loss():
    loss = LearnedGANLoss()
    before = torch.cat([p.detach().clone() for p in loss.parameters()])
    rows: list[dict] = []
    search(loss, TINY, lr=1e-3, generations=2, popsize=3, progress=rows.append)
    assert not torch.equal(before, torch.cat([p.detach() for p in loss.parameters()]))
    assert [r["generation"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_the_gan_record_script_runs_end_to_end(tmp_path):
    out = tmp_path / "gan"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gan_record.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    rec = json.loads((out / "results.json").read_text())
    assert rec["quick"] is True and set(rec["results"]) == {"learned", *FIXED}
    assert rec["significance"]["selected_on"] == "val/frechet"
    assert rec["significance"]["higher_is_better"] is False
    assert rec["search"]["training_runs"] == rec["tuning"]["hinge"]["runs"]
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gan_record.py"), "--figure", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert (out / "samples.png").stat().st_size > 0 and (out / "samples.pdf").is_file()
    refused = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gan_record.py"), "--readme", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "a --quick run is not a record" in refused.stderr


def test_readme_gan_block_is_generated_from_the_record():
    """README's GAN table is gan_record.py's table of experiments/gan_ring (not typed), and the
    record is a full one (5 test seeds per loss, every lr tuned with the search's runs); so is
    docs/results.md's table of experiments/gan_mnist1d."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gan_record", ROOT / "scripts" / "gan_record.py")
    assert spec is not None and spec.loader is not None
    gan_record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gan_record)
    rec = json.loads((ROOT / "experiments" / "gan_ring" / "results.json").read_text())
    assert rec["quick"] is False and set(rec["results"]) == {"learned", *FIXED}
    assert all(len(v["test/frechet"]) == 5 for v in rec["results"].values())
    runs = rec["search"]["training_runs"]
    assert all(t["runs"] == runs for t in rec["tuning"].values())
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- gan:start -->\n")[1].split("<!-- gan:end -->")[0]
    assert block == "\n".join(gan_record.table(rec)) + "\n"
    # the MNIST-1D record's table lives in docs/results.md, generated the same way
    rec = json.loads((ROOT / "experiments" / "gan_mnist1d" / "results.json").read_text())
    assert rec["quick"] is False and rec["budget"]["data"] == "mnist1d"
    assert all(len(v["test/frechet"]) == 5 for v in rec["results"].values())
    results = (ROOT / "docs" / "results.md").read_text()
    block = results.split("<!-- gan_mnist1d:start -->\n")[1].split("<!-- gan_mnist1d:end -->")[0]
    assert block == "\n".join(gan_record.table(rec)) + "\n"


# ---------------------------------------------------------------- MNIST-1D (gan_mnist1d)


def test_mnist1d_measures_rank_real_signals_above_noise_and_a_collapse():
    """The classifier-feature measures: held-out real signals cover all 10 classes, lie on
    the real manifold more often and are far nearer (Fréchet) than Gaussian noise or one
    signal repeated (a collapsed generator: one class)."""
    from metaloss.gan.mnist1d import precision
    from metaloss.gan.train import real_data

    data = real_data("mnist1d")
    assert data.classifier_test_acc > 0.5  # MNIST-1D's MLPs reach ~0.6-0.7
    g = torch.Generator().manual_seed(0)
    real = data.reference(500, g, "test")
    held_out = data.measures(data.reference(500, g, "val"), real)
    noise = data.measures(torch.randn(500, 40, generator=g), real)
    collapsed = data.measures(data.reference(1, g, "train").expand(500, 40), real)
    assert held_out["modes"] == 10 and collapsed["modes"] == 1
    assert held_out["high_quality"] > noise["high_quality"]
    assert held_out["frechet"] < noise["frechet"] / 5 and held_out["frechet"] < collapsed["frechet"]
    # precision by hand on a tiny case: radius of each real point = its distance to its 1st
    # nearest other real point
    r = torch.tensor([[0.0], [1.0], [3.0]])
    f = torch.tensor([[0.5], [2.5], [5.5]])  # within 1 of 0 or 1; within 2 of 3; outside
    assert precision(f, r, 1) == pytest.approx(2 / 3)


@pytest.mark.slow  # 300 GAN steps on MNIST-1D
def test_a_gan_learns_mnist1d_signals():
    """A short non-saturating GAN on MNIST-1D gets nearer the real signals (Fréchet distance
    on the classifier's features) and covers more classes than its untrained generator
    (which, collapsed near one point, already scores a high precision: why FD and classes
    come with it)."""
    budget = Budget(steps=300, batch=64, hidden=64, samples=500, data="mnist1d")
    untrained = train_gan(
        FIXED["non_saturating"], Budget(**{**budget.__dict__, "steps": 1}), lr=2e-3, seed=0
    )
    trained = train_gan(FIXED["non_saturating"], budget, lr=2e-3, seed=0)
    # measured here: 464.5 -> 311.0, classes 2 -> 3
    assert trained["frechet"] < 0.8 * untrained["frechet"]
    assert trained["modes"] > untrained["modes"]

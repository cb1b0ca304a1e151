"""Policy gradients (issue 20): episodes from Gymnasium's CartPole, REINFORCE against a bandit
with a known gradient, the learned policy loss's warm start, the CMA-ES search, the record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaloss.rl.env import Episodes, collect
from metaloss.rl.losses import LearnedPolicyLoss, reinforce
from metaloss.rl.train import Budget, make_policy, search, train_policy

ROOT = Path(__file__).resolve().parents[1]
TINY = Budget(updates=3, episodes=4, max_steps=40, eval_episodes=4, hidden=8)


def test_reinforce_gradient_on_a_bandit_matches_the_exact_policy_gradient():
    """A 3-armed bandit with softmax policy logits θ and rewards r: the exact gradient of the
    expected reward is ∂/∂θ_j Σ_a π_a r_a = π_j (r_j - Σ_a π_a r_a). REINFORCE's loss
    -log π(a) (r_a - b) averaged over many sampled actions has minus that gradient (any
    constant baseline b leaves it unbiased)."""
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    r = torch.tensor([1.0, 3.0, -1.0])
    pi = torch.softmax(theta.detach(), 0)
    exact = pi * (r - (pi * r).sum())
    a = torch.multinomial(pi, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(theta, 0)[a]
    adv = r[a] - 0.7  # a baseline
    loss = reinforce(logp, adv, torch.zeros_like(adv)).mean()
    (g,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(-g, exact, atol=0.01, rtol=0)  # Monte-Carlo error ~ 0.003


def test_returns_to_go_are_discounted_and_masked():
    ep = Episodes(
        obs=torch.zeros(1, 4, 4),
        actions=torch.zeros(1, 4, dtype=torch.long),
        rewards=torch.ones(1, 4),
        mask=torch.tensor([[True, True, True, False]]),
    )
    torch.testing.assert_close(ep.returns_to_go(0.5), torch.tensor([[1.75, 1.5, 1.0, 0.0]]))
    assert ep.returns.tolist() == [3.0]


def test_a_seed_fixes_the_episodes_and_steps_after_termination_are_masked():
    policy = make_policy(8, seed=0)
    a, b = collect(policy, "cartpole", 5, 60, seed=3), collect(policy, "cartpole", 5, 60, seed=3)
    c = collect(policy, "cartpole", 5, 60, seed=4)
    assert torch.equal(a.obs, b.obs) and torch.equal(a.actions, b.actions)
    assert not torch.equal(a.obs[:, 0], c.obs[:, 0])  # other resets
    done = (~a.mask).float().cumsum(1) > 0  # once an episode has ended it stays ended
    assert torch.equal(~a.mask, done)
    assert (a.returns == a.mask.sum(1)).all()  # CartPole: reward 1 per step balanced
    with pytest.raises(ValueError, match="rl.env"):
        collect(policy, "pendulum", 2, 10, seed=0)


def test_the_learned_policy_loss_starts_exactly_at_reinforce():
    g = torch.Generator().manual_seed(0)
    logp, adv, t = (torch.randn(3, 7, generator=g) for _ in range(3))
    assert torch.equal(LearnedPolicyLoss()(logp, adv, t), reinforce(logp, adv, t))
    first = [LearnedPolicyLoss().net[0].weight for _ in range(2)]
    assert torch.equal(*first)  # φ₀ depends on the seed only: a search is reproducible
    a = train_policy(LearnedPolicyLoss(), TINY, lr=0.01, seed=5)
    b = train_policy(reinforce, TINY, lr=0.01, seed=5)
    assert a["return"] == b["return"] and a["curve"] == b["curve"]


def test_bad_settings_are_refused_before_training():
    with pytest.raises(ValueError, match="task.updates"):
        Budget(updates=0)
    with pytest.raises(ValueError, match="task.gamma"):
        Budget(gamma=1.5)
    with pytest.raises(ValueError, match="rl lr"):
        train_policy(reinforce, TINY, lr=-1.0, seed=0)
    with pytest.raises(ValueError, match="rl.generations"):
        search(LearnedPolicyLoss(), TINY, lr=0.01, generations=0)


def test_a_diverging_loss_scores_nan_not_a_return():
    def exploding(logp, adv, t):
        return logp * float("inf")

    out = train_policy(exploding, TINY, lr=0.01, seed=0)
    assert out["return"] != out["return"] and out["val_return"] != out["val_return"]


@pytest.mark.slow
def test_cma_es_search_moves_the_learned_loss_and_reports_each_generation():
    loss = LearnedPolicyLoss(hidden=4)
    before = torch.cat([p.detach().flatten().clone() for p in loss.parameters()])
    rows = []
    out = search(
        loss, TINY, lr=0.01, generations=2, seeds=1, popsize=3, sigma0=0.3, progress=rows.append
    )
    after = torch.cat([p.detach().flatten() for p in out.loss.parameters()])
    assert not torch.equal(before, after)
    assert [r["generation"] for r in rows] == [1, 2] and all(r["diverged"] == 0 for r in rows)
    assert all(0 < r["best_return"] <= TINY.max_steps for r in rows)


@pytest.mark.slow
def test_the_record_script_runs_end_to_end(tmp_path):
    out = tmp_path / "rl"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rl_record.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    rec = json.loads((out / "results.json").read_text())
    assert rec["quick"] is True and set(rec["results"]) >= {"learned", "reinforce"}
    assert rec["significance"]["selected_on"] == "val/return"
    assert rec["search"]["training_runs"] == rec["tuning"]["reinforce"]["runs"]
    assert (out / "learning_curves.png").stat().st_size > 0
    # a smoke run never reaches README's results
    refused = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rl_record.py"), "--readme", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "a --quick run is not a record" in refused.stderr


def test_readme_rl_block_is_generated_from_the_record():
    """README's policy-gradient table is rl_record.py's table of experiments/rl_cartpole (not
    typed), and the record is a full one (10 test seeds, both lrs tuned with the search's runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_record", ROOT / "scripts" / "rl_record.py")
    assert spec is not None and spec.loader is not None
    rl_record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl_record)
    rec = json.loads((ROOT / "experiments" / "rl_cartpole" / "results.json").read_text())
    assert rec["quick"] is False
    assert all(len(v["test/return"]) == 10 for v in rec["results"].values())
    runs = rec["search"]["training_runs"]
    assert rec["tuning"]["reinforce"]["runs"] == runs == rec["tuning"]["learned"]["runs"]
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- rl:start -->\n")[1].split("<!-- rl:end -->")[0]
    assert block == "\n".join(rl_record.table(rec, 10)) + "\n"


def test_the_baseline_leaves_the_episode_out_and_a_lone_survivor_keeps_its_signal():
    """Advantages: return-to-go minus the mean of the *other* running episodes at that step
    (then scaled). With one episode still running, its steps keep their return as signal (the
    baseline of all running episodes would zero them)."""
    from metaloss.rl.train import advantages

    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    rewards = torch.ones(3, 3)
    ep = Episodes(torch.zeros(3, 3, 4), torch.zeros(3, 3, dtype=torch.long), rewards, mask)
    g = ep.returns_to_go(1.0)  # [[3,2,1],[1,0,0],[2,1,0]]
    raw = torch.tensor(
        [[3 - 1.5, 2 - 1, 1 - 0], [1 - 2.5, 0, 0], [2 - 2, 1 - 2, 0]]
    )  # others' means: t0 (1+2)/2, (3+2)/2, (3+1)/2; t1 1 and 2; t2 none
    a = advantages(ep, 1.0)
    scale = (raw**2).sum().div(mask.sum()).sqrt()
    torch.testing.assert_close(a, raw / scale)
    assert a[0, 2] > 0  # the lone survivor's last step is signal, not zero
    assert torch.equal(g, torch.tensor([[3.0, 2, 1], [1, 0, 0], [2, 1, 0]]))
    with pytest.raises(ValueError, match="task.episodes"):
        Budget(episodes=1)


def test_a_generation_with_diverged_candidates_ranks_them_last():
    """CMAES.generation tells NaN as worse than every finite value: the mean then moves as if
    the diverged candidates were the worst (here: toward smaller x0, whatever NaN hides)."""
    import numpy as np

    from metaloss.cmaes import CMAES

    class Phi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.zeros(3))

    def run(hide_best: bool) -> float:
        phi = Phi()
        es = CMAES(phi, sigma0=1.0, popsize=8, seed=0)
        for _ in range(10):

            def f(c: np.ndarray) -> list[float]:
                v = c[:, 0].tolist()
                order = np.argsort(v)
                for i in order[:3] if hide_best else []:
                    v[i] = float("nan")
                return v

            es.generation(f)
        return float(phi.x[0])

    assert run(hide_best=False) < -3  # minimising x0
    assert run(hide_best=True) > run(hide_best=False)  # NaN never counts as good

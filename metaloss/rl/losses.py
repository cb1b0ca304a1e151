"""Policy losses: ``loss(logp, adv, t) -> [n, T]`` per step, where ``logp`` is the log-probability
of the action taken, ``adv`` the normalised advantage (return-to-go minus the time step's mean
over the batch's episodes, divided by their spread) and ``t`` the step's fraction of the
episode limit, all ``[n, T]``. The trainer masks the steps after termination, sums over steps
and averages over episodes.

A new fixed loss is one such function, decorated ``@fits("policy")``, and one YAML in
``conf/loss/`` naming it (``_partial_: true``): ``metaloss-train task=cartpole loss=my_loss``
(docs/rl.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metaloss.losses.base import ParametricLoss, fits


@fits("policy")
def reinforce(logp: Tensor, adv: Tensor, t: Tensor, **_: Any) -> Tensor:
    """REINFORCE with a baseline (Williams, "Simple statistical gradient-following algorithms
    for connectionist reinforcement learning", Machine Learning 1992): ``-log π(a|s) · A``,
    the baseline being the time step's mean return-to-go (in ``adv``)."""
    return -logp * adv


class LearnedPolicyLoss(ParametricLoss):
    """A learned policy loss in ML3's manner (Bechtle et al., "Meta Learning via Learned Loss",
    ICPR 2021, whose policy-learning experiments feed the loss network the log-probability, the
    return and the time step): ``-log π · A + g_φ(log π, A, t)`` with ``g_φ`` a small tanh MLP
    whose output layer starts at zero, so φ₀ is exactly :func:`reinforce` (a warm start). Its
    policy gradient is ``-(A - ∂g/∂log π) ∇ log π``: the advantage shifted by a learned,
    state-dependent term — biased as a gradient estimate in general, which the search may
    trade for lower variance."""

    kinds = ("policy",)

    def __init__(self, hidden: int = 8, seed: int = 0) -> None:
        super().__init__(hidden=hidden, seed=seed)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"loss.hidden = {hidden!r}: must be an integer >= 1")
        with torch.random.fork_rng():  # φ₀ is a function of ``seed``, not of the global RNG
            torch.manual_seed(seed)
            first = nn.Linear(3, hidden)
            out = nn.Linear(hidden, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(first, nn.Tanh(), out)

    # the policy-loss contract (logp, adv, t), not the supervised (pred, target)
    def forward(self, logp: Tensor, adv: Tensor, t: Tensor, **_: Any) -> Tensor:  # type: ignore[override]
        features = torch.stack([logp, adv, t], dim=-1)
        return -logp * adv + self.net(features).squeeze(-1)

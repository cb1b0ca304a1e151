"""Episodes of a Gymnasium control task, collected from a batch of environments at once.

CartPole (Barto, Sutton & Anderson 1983) through Gymnasium's own vectorised implementation
(``CartPoleVectorEnv``: numpy over the batch, the dynamics of ``CartPole-v1``), so no physics is
re-derived here. ``seed`` fixes every reset (Gymnasium's ``reset(seed=...)``) and the action
sampling (a private torch generator): the same seed gives the same episodes for the same
policy. Each environment runs until its first termination or ``max_steps``; later steps are
masked out (the vector env's automatic reset is never used).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

ENVS = ("cartpole",)


@dataclass
class Episodes:
    """``n`` episodes padded to ``T`` steps: observations ``[n, T, obs]``, actions ``[n, T]``,
    rewards ``[n, T]`` and ``mask`` ``[n, T]`` (True for a step taken before termination)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of each episode ``[n]`` (CartPole: steps balanced)."""
        return (self.rewards * self.mask).sum(-1)

    def returns_to_go(self, gamma: float) -> Tensor:
        """``G_t = Σ_{k≥t} γ^{k-t} r_k`` ``[n, T]`` (0 after termination)."""
        r = self.rewards * self.mask
        out = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in range(r.shape[1] - 1, -1, -1):
            running = r[:, t] + gamma * running
            out[:, t] = running
        return out * self.mask


def make_env(name: str, n: int, max_steps: int):
    if name not in ENVS:
        raise ValueError(f"rl.env = {name!r}: must be one of {list(ENVS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"rl.episodes = {n!r}: must be an integer >= 1")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"rl.max_steps = {max_steps!r}: must be an integer >= 1")
    from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

    return CartPoleVectorEnv(num_envs=n, max_episode_steps=max_steps)


@torch.no_grad()
def collect(policy: nn.Module, name: str, n: int, max_steps: int, seed: int) -> Episodes:
    """``n`` episodes of ``policy`` (observations -> action logits), fixed by ``seed``."""
    env = make_env(name, n, max_steps)
    gen = torch.Generator().manual_seed(seed)
    try:
        obs_np, _ = env.reset(seed=seed)
        obs, acts, rews, masks = [], [], [], []
        alive = torch.ones(n, dtype=torch.bool)
        for _ in range(max_steps):
            o = torch.as_tensor(obs_np, dtype=torch.float32)
            probs = torch.softmax(policy(o), -1)
            a = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            obs_np, r, term, trunc, _ = env.step(a.numpy())
            obs.append(o)
            acts.append(a)
            rews.append(torch.as_tensor(r, dtype=torch.float32))
            masks.append(alive.clone())
            alive &= ~torch.as_tensor(np.logical_or(term, trunc))
            if not alive.any():
                break
    finally:
        env.close()
    return Episodes(
        torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(rews, 1), torch.stack(masks, 1)
    )

"""CartPole as a task of kind ``policy``: ``metaloss-train task=cartpole loss=reinforce`` trains a
policy with a policy loss; ``metaloss-meta task=cartpole loss=learned_policy optim=adam
meta_optim=cmaes`` searches a learned one (docs/rl.md). The task holds the training budget (its
config's values); the policy's Adam optimizer is its own (:func:`metaloss.rl.train.train_policy`),
at the run's ``optim.lr``."""

from __future__ import annotations

from typing import Any

from metaloss.rl.train import Budget, search, train_policy
from metaloss.tasks.own_loop import OwnLoopTask


class CartPole(OwnLoopTask):
    """``updates`` policy updates, each on ``episodes`` fresh episodes of at most ``max_steps``
    steps, returns discounted by ``gamma`` for the advantages, a tanh policy of ``hidden`` units;
    scored on ``eval_episodes`` episodes (:class:`metaloss.rl.train.Budget`)."""

    kind = "policy"
    name = "cartpole"
    primary_metric = "test/return"
    search_fn = search  # CMA-ES on the mean return

    def __init__(
        self,
        updates: int = 40,
        episodes: int = 16,
        max_steps: int = 200,
        eval_episodes: int = 32,
        gamma: float = 0.99,
        hidden: int = 32,
    ) -> None:
        self.budget = Budget(
            updates=updates,
            episodes=episodes,
            max_steps=max_steps,
            eval_episodes=eval_episodes,
            gamma=gamma,
            hidden=hidden,
        )

    def debug_sized(self, **keep: Any) -> CartPole:
        """The same task in seconds (``debug=default``): two updates of two short episodes;
        ``keep``: settings that stay as given."""
        small = dict(updates=2, episodes=2, max_steps=20, eval_episodes=2, hidden=4)
        return CartPole(**{**small, "gamma": self.budget.gamma, **keep})

    def describe(self) -> str:
        b = self.budget
        return f"cartpole ({b.updates} updates of {b.episodes} episodes, <= {b.max_steps} steps)"

    def train(self, loss: Any, *, lr: float, seed: int) -> dict[str, float]:
        """One training run: the trained policy's mean return on the test and validation
        episode streams."""
        m = train_policy(loss, self.budget, lr=lr, seed=seed)
        return {"test/return": float(m["return"]), "val/return": float(m["val_return"])}  # type: ignore[arg-type]

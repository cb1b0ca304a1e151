"""Inner losses for few-shot adaptation: what MAML's inner loop minimises on an episode.

Contract: ``loss(step, support, y_support, query) -> scalar``, where ``support`` and ``query``
are :class:`Observation` s of the model on the support and query inputs (its outputs and the
layer-wise means of its hidden activations) and ``query`` is ``None`` unless the loss sets
``uses_query``. Query *labels* never reach an inner loss. The module's parameters are φ, called
through ``functional_call`` so that vmap over episodes and gradients through the inner loop
work as for every other loss of metaloss.

* :class:`PerExample` wraps any loss of the catalogue (``metaloss.losses``): a fixed one (cross-
  entropy: plain MAML) or a parametric one, the same for every task and step (ML3: Bechtle et al.,
  "Meta Learning via Learned Loss", ICPR 2021).
* :class:`MeTAL` is the task-adaptive loss of Baik et al., "Meta-Learning with Task-Adaptive Loss
  Function for Few-Shot Learning", ICCV 2021 (described in :class:`MeTAL`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Observation(NamedTuple):
    """The model on a set of inputs: ``out`` [n, C] logits (or [n, D] predictions) and
    ``means`` [L], the mean of each hidden layer's activations over the set and the units."""

    out: Tensor
    means: Tensor


def task_loss(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Per-example loss of the task itself: cross-entropy (classification) or squared error."""
    if kind == "classification":
        return F.cross_entropy(out, y, reduction="none")
    return ((out - y) ** 2).flatten(1).mean(1)


def target_features(kind: str, y: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """Targets as loss-network inputs: one-hot labels (by comparison: ``F.one_hot`` does not
    run under vmap), or the regression targets."""
    if kind == "classification":
        return (y[:, None] == torch.arange(width, device=y.device)).to(dtype)
    return y.flatten(1).to(dtype)


class InnerLoss(nn.Module):
    """Base class (the contract in the module docstring)."""

    uses_query: bool = False
    kind: str = "classification"

    def forward(
        self, step: int, support: Observation, y: Tensor, query: Observation | None
    ) -> Tensor:  # pragma: no cover - the contract
        raise NotImplementedError


class PerExample(InnerLoss):
    """Mean over the support set of a per-example loss ``loss(pred, target) -> [n]``: a fixed
    loss of the catalogue (``ce``: MAML) or a parametric one (``ml3``: one learned loss for
    every task and step). ``kind``: classification or regression (the episodes' kind)."""

    def __init__(self, loss: Callable[..., Tensor] | nn.Module, kind: str = "classification"):
        super().__init__()
        if kind not in ("classification", "regression"):
            raise ValueError(f"fewshot_loss.kind = {kind!r}: classification or regression")
        self.kind = kind
        self.loss = loss  # an nn.Module registers as a submodule: its parameters are φ

    def forward(
        self, step: int, support: Observation, y: Tensor, query: Observation | None
    ) -> Tensor:
        return self.loss(support.out, y).mean()


def _mlp_params(steps: int, d_in: int, hidden: int) -> nn.ParameterDict:
    """One two-layer network per inner step, stacked: [steps, ...] tensors. The output layer
    starts at zero (the network's value and the loss's change start at zero)."""
    w1 = torch.empty(steps, hidden, d_in)
    for s in range(steps):
        nn.init.kaiming_uniform_(w1[s], a=5**0.5)
    bound = 1 / d_in**0.5
    return nn.ParameterDict(
        {
            "w1": nn.Parameter(w1),
            "b1": nn.Parameter(torch.empty(steps, hidden).uniform_(-bound, bound)),
            "w2": nn.Parameter(torch.zeros(steps, 1, hidden)),
            "b2": nn.Parameter(torch.zeros(steps, 1)),
        }
    )


def _affine_mlp(net: nn.ParameterDict, step: int, x: Tensor, mod: Tensor) -> Tensor:
    """The step's network on per-example features ``x`` [n, d], its weights transformed by
    the adapter's output ``mod`` = (γ1, β1, γ2, β2), one (γ, β) per output unit:
    W' = (1 + γ) ⊙ W + β row-wise (γ = β = 0: the network itself)."""
    h = net["w1"].shape[1]
    g1, be1, g2, be2 = mod.split([h, h, 1, 1])
    w1 = (1 + g1)[:, None] * net["w1"][step] + be1[:, None]
    w2 = (1 + g2)[:, None] * net["w2"][step] + be2[:, None]
    z = torch.relu(squash(x) @ w1.T + net["b1"][step])
    return torch.tanh((z @ w2.T + net["b2"][step]).squeeze(-1))


def squash(x: Tensor) -> Tensor:
    """sign(x) · log(1 + |x|): the state's features on one scale (a squared error of 25 and a
    layer mean of 0.1 both reach the network), monotone, so nothing is lost."""
    return torch.sign(x) * torch.log1p(x.abs())


class MeTAL(InnerLoss):
    """Task-adaptive learned loss (Baik et al., ICCV 2021), built from the paper's description
    (docs/fewshot.md lists where it differs from the authors' implementation):

    * per inner step j, a **support loss network** over the labelled support set's task state
      — per example: the task loss (cross-entropy), the layer-wise means of the model's
      activations, the model's outputs (logits) and the one-hot label;
    * per step, a **query loss network** over the *unlabelled* query set's state (layer means
      and outputs): the inner loop adapts on query inputs too (semi-supervised);
      ``query=False`` drops it (the paper's ablation);
    * per step, an **adapter** that maps the task state (its mean over the support examples,
      and over the query examples) to an affine transform (γ, β) of each loss network's
      weights, so the loss adapts to each task; ``adaptive=False`` drops it.

    Every network reads its inputs through :func:`squash` and its per-example output through
    ``tanh``: the learned terms are bounded, so the inner loop cannot drive the loss to −∞ by
    exploiting them (without the bound, MeTAL diverged in 5-shot and sinusoid meta-training
    here: the inner loop followed an unbounded learned term to NaN).

    The inner loss is ``base + support net + query net`` with ``residual=True`` (default): the
    networks' output layers and the adapter's start at zero, so φ at its start is exactly
    MAML's cross-entropy and the meta-training moves it only as far as the query objective says
    (as :mod:`metaloss.residual` does for warm starts). ``residual=False`` drops the base term:
    the learned networks alone (then they need training to be useful at all). Regression
    episodes work alike (squared error and targets for cross-entropy and one-hot labels).
    """

    def __init__(
        self,
        *,
        out_dim: int,
        layers: int,
        steps: int,
        kind: str = "classification",
        hidden: int = 32,
        adapter_hidden: int = 32,
        query: bool = True,
        adaptive: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        for key, v, lo in (
            ("out_dim", out_dim, 1),
            ("layers", layers, 0),
            ("steps", steps, 1),
            ("hidden", hidden, 1),
            ("adapter_hidden", adapter_hidden, 1),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"fewshot_loss.{key} = {v!r}: must be an integer >= {lo}")
        if kind not in ("classification", "regression"):
            raise ValueError(f"fewshot_loss.kind = {kind!r}: classification or regression")
        self.kind, self.out_dim, self.steps = kind, out_dim, steps
        self.uses_query, self.adaptive, self.residual = bool(query), bool(adaptive), residual
        self.d_support = 1 + layers + 2 * out_dim  # task loss, layer means, outputs, targets
        self.d_query = layers + out_dim  # layer means, outputs
        self.support_net = _mlp_params(steps, self.d_support, hidden)
        mod = 2 * hidden + 2
        if self.uses_query:
            self.query_net = _mlp_params(steps, self.d_query, hidden)
        d_state = self.d_support + (self.d_query if self.uses_query else 0)
        n_mod = mod * (2 if self.uses_query else 1)
        if self.adaptive:
            a1 = torch.empty(steps, adapter_hidden, d_state)
            for s in range(steps):
                nn.init.kaiming_uniform_(a1[s], a=5**0.5)
            self.adapter = nn.ParameterDict(
                {
                    "w1": nn.Parameter(a1),
                    "b1": nn.Parameter(torch.zeros(steps, adapter_hidden)),
                    "w2": nn.Parameter(torch.zeros(steps, n_mod, adapter_hidden)),
                    "b2": nn.Parameter(torch.zeros(steps, n_mod)),
                }
            )
        self._mod = mod

    def forward(
        self, step: int, support: Observation, y: Tensor, query: Observation | None
    ) -> Tensor:
        j = min(step, self.steps - 1)  # more steps than networks: the last one goes on
        base = task_loss(self.kind, support.out, y)  # [n]
        n = support.out.shape[0]
        s_state = torch.cat(
            [
                base[:, None],
                support.means.expand(n, -1),
                support.out.flatten(1),
                target_features(self.kind, y, self.out_dim, support.out.dtype),
            ],
            1,
        )
        states = [s_state]
        if self.uses_query:
            if query is None:
                raise ValueError("MeTAL(query=True) needs the query set's observation")
            m = query.out.shape[0]
            q_state = torch.cat([query.means.expand(m, -1), query.out.flatten(1)], 1)
            states.append(q_state)
        if self.adaptive:
            summary = squash(torch.cat([s.mean(0) for s in states]))
            a = self.adapter
            mods = torch.relu(a["w1"][j] @ summary + a["b1"][j]) @ a["w2"][j].T + a["b2"][j]
        else:
            mods = s_state.new_zeros(self._mod * len(states))
        value = _affine_mlp(self.support_net, j, s_state, mods[: self._mod]).mean()
        if self.uses_query:
            value = value + _affine_mlp(self.query_net, j, states[1], mods[self._mod :]).mean()
        return base.mean() + value if self.residual else value

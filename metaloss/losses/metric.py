"""Metric-learning losses: fixed pair-, triplet- and prototype-based losses and a learned
pair-based family, for the ``embedding`` task kind (:mod:`metaloss.tasks.embedding`).

``pred`` is a batch of embeddings ``[B, D]`` (normalised here: similarities are cosine) and
``target`` the class labels ``[B]``. Each loss returns one value per *anchor* ``[B]``: the
anchor's terms over the other examples of the batch (its positives share its class, its
negatives do not), averaged over its pairs, so the caller's mean over the batch is the
usual loss and the engine's contract (``loss(pred, target) -> [B]``) holds unchanged. An
anchor without a positive in the batch contributes its negative terms (contrastive,
multi-similarity) or nothing (triplet, prototype), and still counts in the caller's mean.
The forms are pytorch-metric-learning's (non-squared distances, two margins), each docstring
saying where it departs from the cited paper.

Why not pytorch-metric-learning's loss classes, the library the field uses: they select pairs
with data-dependent shapes (``torch.where`` on the label matrix, miners returning index
lists), which neither ``vmap`` over tasks and seeds nor the functional inner loop can trace.
These are written with masks over the full ``[B, B]`` similarity matrix instead, and tested
against pytorch-metric-learning's per-pair losses (tests/test_metric_learning.py); its
``AccuracyCalculator`` is what scores the embeddings (:func:`metaloss.kinds.score_embedding`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.losses.base import ParametricLoss, fits

MINING = ("all", "batch_hard")


def pair_masks(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine similarities ``[B, B]`` of the embeddings and the positive (same class, not
    itself) and negative (other class) masks. vmap-safe."""
    e = F.normalize(pred.reshape(pred.shape[0], -1), dim=-1)
    sim = e @ e.transpose(-1, -2)
    y = target.reshape(-1)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=pred.device)
    return sim, same & ~eye, ~same


def distance(sim: Tensor) -> Tensor:
    """Euclidean distance of unit vectors from their cosine similarity (what
    pytorch-metric-learning's normalised ``LpDistance`` gives), kept off sqrt's pole at 0."""
    return (2 - 2 * sim).clamp_min(1e-12).sqrt()


def _check(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    """Refuse a setting outside its valid range (a loss identically 0 or infinite would train
    nothing, silently)."""
    ok = low < value <= high if open_low else low <= value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"loss.{name} = {value!r}: must be in {bracket}{low}, {high}]")


def masked_mean(v: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(v.dtype)
    return (v * m).sum(-1) / m.sum(-1).clamp_min(1)


def _log1p_sum_exp(z: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + Σ_{mask} exp(z))`` per row, stable (0 for an empty row)."""
    z = torch.where(mask, z, torch.full_like(z, -math.inf))
    return torch.logsumexp(torch.cat([torch.zeros_like(z[..., :1]), z], dim=-1), dim=-1)


@fits("embedding")
def contrastive(
    pred: Tensor, target: Tensor, pos_margin: float = 0.0, neg_margin: float = 1.0, **_: Any
) -> Tensor:
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) in pytorch-metric-learning's form:
    positives pulled within ``pos_margin``, negatives pushed past ``neg_margin`` (Euclidean
    distance of the normalised embeddings, not squared as in the paper, which has one margin);
    per anchor, each term's mean over its pairs."""
    _check("pos_margin", pos_margin, 0.0, 2.0)
    _check("neg_margin", neg_margin, 0.0, 2.0)
    if pos_margin >= neg_margin:
        raise ValueError(f"loss.pos_margin = {pos_margin} must be < loss.neg_margin = {neg_margin}")
    sim, pos, neg = pair_masks(pred, target)
    d = distance(sim)
    return masked_mean(F.relu(d - pos_margin), pos) + masked_mean(F.relu(neg_margin - d), neg)


@fits("embedding")
def triplet(
    pred: Tensor, target: Tensor, margin: float = 0.05, mining: str = "all", **_: Any
) -> Tensor:
    """Triplet margin loss (Weinberger & Saul, JMLR 2009; Schroff et al., FaceNet, CVPR 2015):
    ``relu(d(a, p) - d(a, n) + margin)`` with non-squared distances (FaceNet squares them).
    ``mining="all"``: the mean over every (positive, negative) of the anchor; ``"batch_hard"``:
    its hardest positive and hardest negative only (Hermans, Beyer & Leibe, "In Defense of the
    Triplet Loss", 2017; there on P×K batches, here on whatever batch the sampler draws)."""
    _check("margin", margin, 0.0, 2.0)
    if mining not in MINING:
        raise ValueError(f"loss.mining must be one of {MINING}, got {mining!r}")
    sim, pos, neg = pair_masks(pred, target)
    d = distance(sim)
    if mining == "batch_hard":
        hardest_pos = torch.where(pos, d, torch.zeros_like(d)).amax(-1)
        hardest_neg = torch.where(neg, d, torch.full_like(d, math.inf)).amin(-1)
        ok = pos.any(-1) & neg.any(-1)
        gap = torch.where(ok, hardest_pos - hardest_neg, torch.full_like(hardest_pos, -math.inf))
        return F.relu(gap + margin)
    return _mean_over_triplets(d, pos, neg, margin)


def _mean_over_triplets(d: Tensor, pos: Tensor, neg: Tensor, margin: float) -> Tensor:
    """Per anchor a, the mean over its (p, n) of ``relu(d_ap - d_an + margin)`` in
    O(B² log B) time and O(B²) memory, not the B³ of the triplet tensor (8 GB at B = 1280):
    with the anchor's negative distances sorted and summed cumulatively, a positive's
    threshold τ = d_ap + margin counts the k negatives below it by binary search, and their
    terms sum to k τ - (sum of those k distances). vmap-safe and differentiable in d."""
    far = torch.full_like(d, 1e4)  # past every threshold (d <= 2, margin <= 2): never counted
    dn = torch.where(neg, d, far).sort(-1).values
    csum = torch.cat([torch.zeros_like(dn[:, :1]), dn.cumsum(-1)], dim=-1)
    tau = (d + margin).contiguous()
    k = torch.searchsorted(dn.contiguous(), tau)  # negatives with d_an < τ
    terms = k.to(d.dtype) * tau - csum.gather(-1, k)
    count = pos.sum(-1).to(d.dtype) * neg.sum(-1).to(d.dtype)
    return (terms * pos.to(d.dtype)).sum(-1) / count.clamp_min(1)


@fits("embedding")
def multi_similarity(
    pred: Tensor,
    target: Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    **_: Any,
) -> Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019), over all pairs — without the paper's
    ε-mining step (pytorch-metric-learning's loss without its miner):
    ``1/α log(1 + Σ_p exp(-α (s_p - base))) + 1/β log(1 + Σ_n exp(β (s_n - base)))``."""
    _check("alpha", alpha, 0.0, 1e4, open_low=True)
    _check("beta", beta, 0.0, 1e4, open_low=True)
    _check("base", base, -1.0, 1.0)
    sim, pos, neg = pair_masks(pred, target)
    return (
        _log1p_sum_exp(-alpha * (sim - base), pos) / alpha
        + _log1p_sum_exp(beta * (sim - base), neg) / beta
    )


@fits("embedding")
def prototype(pred: Tensor, target: Tensor, temperature: float = 0.1, **_: Any) -> Tensor:
    """A proxy loss with the batch's class means as proxies (after prototypical networks, Snell
    et al., NeurIPS 2017, which use squared Euclidean distance to the class mean): cross-entropy
    of the anchor over the classes of the batch, the logit of class k being the anchor's mean
    cosine similarity to k's members (itself excluded) — its dot product with their unnormalised
    mean — over ``temperature``. ProxyNCA's and Proxy-Anchor's proxies are *learned*
    vectors; the loss contract keeps trainable state out of fixed losses, hence batch means.
    An anchor alone in its class has no proxy of its own and contributes 0."""
    _check("temperature", temperature, 0.0, 1e4, open_low=True)
    sim, pos, neg = pair_masks(pred, target)
    same = pos | torch.eye(len(pos), dtype=torch.bool, device=pos.device)
    others = ~torch.eye(len(pos), dtype=torch.bool, device=pos.device)  # l != i
    member = same.to(sim.dtype)
    s_excl = sim * others.to(sim.dtype)
    count = others.to(sim.dtype) @ member  # [i, j]: members of j's class other than i
    mean_sim = (s_excl @ member) / count.clamp_min(1)  # [i, j]: i's mean sim to j's class
    # each class appears once per member among the columns: weight a column by 1 / class size
    logits = mean_sim / temperature - member.sum(-1).log()[None, :]
    valid = count > 0
    # a finite fill, not -inf: a row with no valid column must not give NaN gradients
    log_z = torch.logsumexp(torch.where(valid, logits, torch.full_like(logits, -1e9)), -1)
    own = torch.diagonal(mean_sim) / temperature
    return torch.where(torch.diagonal(valid), log_z - own, torch.zeros_like(own))


class LearnedPairLoss(ParametricLoss):
    """A learned pair-based loss: multi-similarity with learned coefficients,

    ``w_p/α log(1 + Σ_p exp(-α (s_p - λ_p))) + w_n/β log(1 + Σ_n exp(β (s_n - λ_n)))``,

    φ = (log α, log β, λ_p, λ_n, log w_p, log w_n): six named coefficients, the pair-based
    family's counterpart of TaylorGLO's eight (small enough for CMA-ES, smooth for the gradient
    methods). Initialised at multi-similarity's values (α = 2, β = 50, λ_p = λ_n = 0.5,
    w = 1), where it *is* :func:`multi_similarity` (tested): a search starts at the baseline
    and moves by evidence. Scales are log-parametrised, so every φ is a valid loss."""

    kinds = ("embedding",)

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        lam_pos: float = 0.5,
        lam_neg: float = 0.5,
    ) -> None:
        super().__init__(alpha=alpha, beta=beta, lam_pos=lam_pos, lam_neg=lam_neg)
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"loss.{name} must be > 0, got {v!r}")
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))
        self.lam_pos = nn.Parameter(torch.tensor(float(lam_pos)))
        self.lam_neg = nn.Parameter(torch.tensor(float(lam_neg)))
        self.log_w_pos = nn.Parameter(torch.tensor(0.0))
        self.log_w_neg = nn.Parameter(torch.tensor(0.0))

    def forward(self, pred: Tensor, target: Tensor, **context: Any) -> Tensor:
        sim, pos, neg = pair_masks(pred, target)
        a, b = self.log_alpha.exp(), self.log_beta.exp()
        pull = _log1p_sum_exp(-a * (sim - self.lam_pos), pos) / a
        push = _log1p_sum_exp(b * (sim - self.lam_neg), neg) / b
        return self.log_w_pos.exp() * pull + self.log_w_neg.exp() * push

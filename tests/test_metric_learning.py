"""Metric learning (issue 20): the embedding task, its fixed losses against
pytorch-metric-learning's per-pair losses (an independent reference), the learned pair family,
the retrieval metrics and objective, and both apps end to end on a tiny config."""

from __future__ import annotations

import collections
import json

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners, reducers

from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.cmaes import OBJECTIVES
from metaloss.losses import metric as M
from metaloss.metrics import evaluate
from metaloss.tasks.embedding import embedding_mnist1d


def _batch(b: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(b, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (b,), generator=g)
    y[-1] = 9  # an anchor alone in its class: no positive in the batch
    return e, y


def _per_anchor(out: dict, b: int) -> dict[int, list[float]]:
    """pytorch-metric-learning's per-pair (or per-triplet) losses, grouped by anchor."""
    by = collections.defaultdict(list)
    for v, a in zip(out["losses"].tolist(), out["indices"][0].tolist()):
        by[a].append(v)
    return by


def _mean_or_zero(v: list[float], n: int) -> float:
    return sum(v) / n if n else 0.0


@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.2, 0.8)])
def test_contrastive_matches_pytorch_metric_learning(margins):
    e, y = _batch()
    out = pml.ContrastiveLoss(*margins, reducer=reducers.DoNothingReducer())(e, y)
    _, pos, neg = M.pair_masks(e, y)
    p, n = _per_anchor(out["pos_loss"], len(y)), _per_anchor(out["neg_loss"], len(y))
    ref = torch.tensor(
        [
            _mean_or_zero(p[i], int(pos[i].sum())) + _mean_or_zero(n[i], int(neg[i].sum()))
            for i in range(len(y))
        ],
        dtype=torch.float64,
    )
    got = M.contrastive(e, y, pos_margin=margins[0], neg_margin=margins[1])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)  # sqrt(2-2s) vs cdist


@pytest.mark.parametrize("margin", [0.05, 0.5])
def test_triplet_over_all_triplets_matches_pytorch_metric_learning(margin):
    e, y = _batch(40)
    out = pml.TripletMarginLoss(margin=margin, reducer=reducers.DoNothingReducer())(e, y)["loss"]
    _, pos, neg = M.pair_masks(e, y)
    by = _per_anchor(out, len(y))
    ref = [_mean_or_zero(by[i], int(pos[i].sum() * neg[i].sum())) for i in range(len(y))]
    got = M.triplet(e, y, margin=margin)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), atol=1e-9, rtol=0)
    assert got[-1] == 0  # no positive: no triplet


def test_triplet_batch_hard_matches_pytorch_metric_learnings_miner():
    e, y = _batch()
    hard = miners.BatchHardMiner()(e, y)
    out = pml.TripletMarginLoss(margin=0.1, reducer=reducers.DoNothingReducer())(e, y, hard)
    by = _per_anchor(out["loss"], len(y))
    ref = torch.tensor([by[i][0] if by[i] else 0.0 for i in range(len(y))], dtype=torch.float64)
    torch.testing.assert_close(M.triplet(e, y, margin=0.1, mining="batch_hard"), ref)


def test_triplet_needs_no_cubic_memory_and_refuses_an_unknown_mining():
    """1280 anchors: the triplet tensor would be 8 GB; the sorted form is B² (and exact)."""
    g = torch.Generator().manual_seed(1)
    e, y = torch.randn(1280, 16, generator=g), torch.arange(32).repeat_interleave(40)
    assert torch.isfinite(M.triplet(e, y)).all()
    with pytest.raises(ValueError, match="loss.mining must be one of"):
        M.triplet(e[:8], y[:8], mining="semihard")


@pytest.mark.parametrize("params", [{}, {"alpha": 5.0, "beta": 20.0, "base": 0.3}])
def test_multi_similarity_matches_pytorch_metric_learning(params):
    e, y = _batch()
    pml_params = {k: params.get(k, d) for k, d in (("alpha", 2), ("beta", 50), ("base", 0.5))}
    out = pml.MultiSimilarityLoss(**pml_params, reducer=reducers.DoNothingReducer())(e, y)
    ref = out["loss"]["losses"].reshape(-1)
    torch.testing.assert_close(M.multi_similarity(e, y, **params), ref)


def test_prototype_loss_matches_a_loop_over_class_means():
    e, y = _batch()
    en = F.normalize(e, dim=-1)
    ref = []
    for i in range(len(y)):
        logits = {}
        for k in y.unique().tolist():
            members = [j for j in range(len(y)) if y[j] == k and j != i]
            if members:
                logits[k] = (en[i] @ en[members].T).mean() / 0.1
        own = int(y[i])
        ref.append(
            torch.logsumexp(torch.stack(list(logits.values())), 0) - logits[own]
            if own in logits
            else torch.tensor(0.0, dtype=torch.float64)
        )
    torch.testing.assert_close(M.prototype(e, y, temperature=0.1), torch.stack(ref))


def test_learned_pair_loss_starts_as_multi_similarity_and_its_coefficients_move_it():
    e, y = _batch()
    loss = M.LearnedPairLoss().double()
    torch.testing.assert_close(loss(e, y), M.multi_similarity(e, y))
    assert sorted(n for n, _ in loss.named_parameters()) == [
        "lam_neg",
        "lam_pos",
        "log_alpha",
        "log_beta",
        "log_w_neg",
        "log_w_pos",
    ]
    (g,) = torch.autograd.grad(loss(e, y).mean(), [loss.lam_neg])
    assert g.abs() > 0
    with pytest.raises(ValueError, match="loss.beta must be > 0"):
        M.LearnedPairLoss(beta=0.0)


LOSSES = {
    "contrastive": M.contrastive,
    "triplet": M.triplet,
    "batch_hard": lambda p, t: M.triplet(p, t, mining="batch_hard"),
    "multi_similarity": M.multi_similarity,
    "prototype": M.prototype,
    "learned_pair": M.LearnedPairLoss(),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_run_under_vmap_and_give_finite_gradients(name):
    """The engine vmaps the loss over tasks and seeds and differentiates it; an anchor alone
    in its class (no positive, no proxy) must not give NaN gradients, nor must a batch of one
    class, of two examples or of one."""
    fn = LOSSES[name]
    e, y = _batch()
    stacked = torch.stack([e, 2 * e]).float().requires_grad_(True)
    out = torch.vmap(lambda x: fn(x, y).mean())(stacked)
    (g,) = torch.autograd.grad(out.sum(), stacked)
    assert out.shape == (2,) and torch.isfinite(g).all() and g.abs().sum() > 0
    for yy in (torch.zeros(6, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0])):
        x = torch.randn(len(yy), 8, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, yy).sum(), x, allow_unused=True)
        assert g is None or torch.isfinite(g).all(), yy


@pytest.mark.parametrize(
    "call, setting",
    [
        (lambda e, y: M.multi_similarity(e, y, alpha=0.0), "loss.alpha"),
        (lambda e, y: M.prototype(e, y, temperature=-0.1), "loss.temperature"),
        (lambda e, y: M.triplet(e, y, margin=-1.0), "loss.margin"),
        (lambda e, y: M.contrastive(e, y, pos_margin=0.9, neg_margin=0.5), "loss.pos_margin"),
    ],
)
def test_settings_that_would_train_nothing_are_refused(call, setting):
    e, y = _batch()
    with pytest.raises(ValueError, match=setting):
        call(e, y)


def test_a_validation_batch_is_refused_on_embedding_tasks(compose_cfg):
    """Validation rows are drawn with replacement: a repeated row would be its own nearest
    neighbour, a free correct retrieval."""
    from hydra.utils import instantiate

    from metaloss.validate import check_against_task

    cfg = compose_cfg("meta", [*TINY_TASK, "loss=learned_pair", "meta.val_batch=16"])
    with pytest.raises(Exception, match="meta.val_batch = 16"):
        check_against_task(cfg, instantiate(cfg.task))


def test_recall_error_is_one_minus_recall_at_1_of_pytorch_metric_learning():
    e, y = _batch(60, seed=3)
    e, y = e[:-1], y[:-1]  # every class twice or more (as in every embedding task: see below)
    ref = evaluate("embedding", e.float(), y, prefix="v")
    err = OBJECTIVES["recall_error"](e.float(), y)
    assert err.mean().item() == pytest.approx(1 - ref["v/recall_at_1"], abs=1e-6)
    batched = torch.vmap(lambda o: OBJECTIVES["recall_error"](o, y).mean())(
        torch.stack([e.float(), -e.float()])
    )
    assert batched[0].item() == pytest.approx(err.mean().item(), abs=1e-6)
    assert 0 <= ref["v/map_at_r"] <= 1
    nan = evaluate("embedding", torch.full((4, 3), float("nan")), y[:4], prefix="v")
    assert all(v != v for v in nan.values())  # a diverged model has no metric


@pytest.mark.slow
def test_embedding_task_holds_out_classes_and_fresh_draws_keep_the_test_classes():
    a, b = embedding_mnist1d(seed=0), embedding_mnist1d(seed=1)
    for t in (a, b):
        splits = [set(t.y_train.tolist()), set(t.y_val.tolist()), set(t.y_test.tolist())]
        assert [len(s) for s in splits] == [32, 16, 16]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        assert t.out_dim == 32 and t.num_classes == 32
    assert a.info["test_classes"] == b.info["test_classes"]
    assert torch.equal(a.y_test, b.y_test)
    # the same test examples (standardised with each draw's own training statistics: compare
    # their correlation, which standardisation keeps)
    za = (a.x_test - a.x_test.mean()) / a.x_test.std()
    zb = (b.x_test - b.x_test.mean()) / b.x_test.std()
    assert torch.corrcoef(torch.stack([za.flatten(), zb.flatten()]))[0, 1] > 0.99
    assert not torch.equal(a.x_train, b.x_train)  # another split of the non-test classes
    with pytest.raises(ValueError, match="task.classes"):
        embedding_mnist1d(classes=[32, 16])
    with pytest.raises(ValueError, match="task.embed_dim"):
        embedding_mnist1d(embed_dim=0)


TINY_TASK = ["task=embedding_mnist1d", "task.classes=[8,4,4]", "task.per_class=10"]
TINY = [*TINY_TASK, "logger=none", "progress=false", "model=mlp", "model.hidden=[16]"]


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "multi_similarity", "prototype"])
def test_metaloss_train_runs_each_fixed_loss_from_config(compose_cfg, tmp_path, loss):
    cfg = compose_cfg("train", [*TINY, f"loss={loss}", "train.steps=30", "train.batch_size=32"])
    train_app.run(cfg, tmp_path, loss)
    result = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert 0 <= result["test/recall_at_1"] <= 1 and 0 <= result["val/map_at_r"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "search",
    [
        ["meta_optim=cmaes", "meta_optim.objective=recall_error", "meta_optim.popsize=3"],
        ["hypergrad=unrolled"],  # a smooth surrogate: the default objective, multi-similarity
    ],
)
def test_metaloss_meta_learns_a_pair_loss_and_tests_it_against_the_baselines(
    compose_cfg, tmp_path, search
):
    cfg = compose_cfg(
        "meta",
        [
            *TINY,
            "loss=learned_pair",
            *search,
            "meta.steps=2",
            "meta.inner_steps=5",
            "meta.tasks_per_step=1",
            "meta.inner_batch=32",
            "meta.plot_every=100",
            "meta_test.seeds=2",
            "meta_test.steps=20",
            "meta_test.batch_size=32",
        ],
    )
    out = meta_app.run(cfg, tmp_path, "learned_pair")
    assert (tmp_path / "learned_loss.pt").is_file()
    comp = json.loads((tmp_path / "comparison.json").read_text())
    assert set(comp["results"]) == {
        "learned",
        "contrastive",
        "triplet",
        "multi_similarity",
        "prototype",
    }
    learned = comp["results"]["learned"]["test/recall_at_1"]
    assert len(learned) == 2 and all(0 <= v <= 1 for v in learned)  # finite, in range
    assert out["significance"]["metric"] == "test/recall_at_1"
    text = (tmp_path / "comparison.md").read_text()
    assert "test/recall_at_1" in text
    for name in ("learned", "contrastive", "triplet", "multi_similarity", "prototype"):
        assert f"| {name} |" in text


def test_loss_shapes_of_pair_losses_are_drawn_along_the_positive_similarity(tmp_path):
    """The learned-loss pictures (metaloss.plots) of an embedding task: each loss along the
    anchor-positive similarity, every one of them falling as the positive comes closer."""
    from metaloss.plots import loss_curves, plot_losses

    losses = {
        "learned": M.LearnedPairLoss(),
        "contrastive": M.contrastive,
        "multi_similarity": M.multi_similarity,
        "prototype": M.prototype,
    }
    x, curves, label = loss_curves(losses, "embedding", n=50)
    assert "positive" in label and set(curves) == set(losses)
    for name, y in curves.items():
        assert y.shape == (50,) and torch.isfinite(y).all(), name
        assert y[0] > y[-1] and (y[1:] <= y[:-1] + 1e-6).all(), name
    torch.testing.assert_close(curves["learned"], curves["multi_similarity"], atol=1e-5, rtol=0)
    png = plot_losses(losses, "embedding", tmp_path / "shapes.png")
    assert png.stat().st_size > 0 and png.with_suffix(".pdf").is_file()

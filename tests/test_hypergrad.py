"""Hypergradient parity: torch.func unrolled == higher == finite differences; truncated
with k=K == unrolled; first-order exact for K=1."""

import pytest
import torch

from metaloss.hypergrad.base import LR_KEY, MetaProblem, batched_objective, meta_params
from metaloss.hypergrad.first_order import FirstOrder
from metaloss.hypergrad.higher_backend import HigherBackend
from metaloss.hypergrad.truncated import Truncated
from metaloss.hypergrad.unrolled import Unrolled
from metaloss.inner import optimizers as O
from metaloss.losses import fixed
from metaloss.losses.mlp import ML3Loss
from metaloss.losses.taylor import TaylorGLO
from metaloss.models import mlp
from metaloss.sampling import sample_meta_batch
from metaloss.tasks.classification import digits
from metaloss.tasks.regression import sine
from metaloss.train import build_model


def _to64(batch):
    return type(batch)(
        {k: v.double() for k, v in batch.theta0.items()},
        *(t.double() if t.is_floating_point() else t for t in batch[1:]),
    )


def _problem(loss, opt, k=3, task="sine"):
    if task == "sine":
        tasks = [sine(seed=s, n_train=20, n_val=15) for s in range(3)]
        objective = fixed.mse
        factory = lambda **kw: mlp(hidden=[8], **kw)  # noqa: E731
    else:
        tasks = [digits()]
        objective = fixed.ce
        factory = lambda **kw: mlp(hidden=[6], **kw)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batch = _to64(
        sample_meta_batch(
            tasks, factory, n_tasks=4, inner_steps=k, inner_batch=10, val_batch=12, gen=gen
        )
    )
    model = build_model(factory, tasks[0], 0).double()
    problem = MetaProblem(model, loss.double(), opt, k, objective, tasks[0].class_counts)
    return problem, batch


def _flat(d):
    return torch.cat([d[k].flatten() for k in sorted(d)])


def _rel(a, b):
    """Relative error of the whole hypergradient vector (a per-key ratio is meaningless for
    coefficients whose true gradient is 0, e.g. TaylorGLO's c_p under softmax: Σ_c p_c = 1)."""
    return ((_flat(a) - _flat(b)).norm() / _flat(b).norm()).item()


OPTS = {
    "sgd": O.sgd(lr=0.1),
    "momentum": O.momentum(lr=0.05),
    "nesterov": O.nesterov(lr=0.05),
    # higher's Adam keeps the pre-2018 placement of eps (sqrt(v) + eps, not
    # sqrt(v)/sqrt(1-b2^t) + eps as torch.optim.Adam and ours): a tiny eps makes them agree.
    "adam": O.adam(lr=0.01, eps=1e-12),
    "rmsprop": O.rmsprop(lr=0.01),
    "adagrad": O.adagrad(lr=0.05),
    "adadelta": O.adadelta(lr=1.0),
}


@pytest.mark.parametrize("opt", sorted(OPTS))
def test_unrolled_equals_higher(opt):
    torch.manual_seed(0)
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS[opt])
    meta = meta_params(problem.loss)
    ours, ref = Unrolled()(problem, meta, batch), HigherBackend()(problem, meta, batch)
    assert _rel(ours.grads, ref.grads) <= 1e-6
    torch.testing.assert_close(ours.loss, ref.loss)
    assert all(g.abs().sum() > 0 for g in ours.grads.values())


def test_unrolled_equals_higher_on_classification_with_learned_lr():
    problem, batch = _problem(TaylorGLO(init="ce"), O.sgd(lr=0.5), task="digits")
    meta = meta_params(problem.loss, torch.tensor(-1.0, dtype=torch.float64))
    ours, ref = Unrolled()(problem, meta, batch), HigherBackend()(problem, meta, batch)
    assert _rel(ours.grads, ref.grads) <= 1e-6 and ours.grads[LR_KEY].abs() > 0


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_unrolled_equals_finite_differences(opt):
    problem, batch = _problem(TaylorGLO(init="mse"), OPTS[opt])
    meta = meta_params(problem.loss)
    grads = Unrolled()(problem, meta, batch).grads
    h = 1e-6
    for k, v in meta.items():
        plus = {**{n: p.detach() for n, p in meta.items()}, k: v.detach() + h}
        minus = {**plus, k: v.detach() - h}
        with torch.no_grad():
            fd = (
                batched_objective(problem, plus, batch) - batched_objective(problem, minus, batch)
            ) / (2 * h)
        torch.testing.assert_close(grads[k], fd, rtol=1e-5, atol=1e-8)


def test_truncated_with_k_equal_K_is_unrolled_and_smaller_k_differs():
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["momentum"], k=4)
    meta = meta_params(problem.loss)
    full = Unrolled()(problem, meta, batch).grads
    assert _rel(Truncated(k=4)(problem, meta, batch).grads, full) <= 1e-12
    assert _rel(Truncated(k=1)(problem, meta, batch).grads, full) > 1e-3


def test_first_order_exact_for_one_step_and_approximate_after():
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["sgd"], k=1)
    meta = meta_params(problem.loss)
    assert (
        _rel(FirstOrder()(problem, meta, batch).grads, Unrolled()(problem, meta, batch).grads)
        <= 1e-12
    )
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["sgd"], k=5)
    fo, full = FirstOrder()(problem, meta, batch).grads, Unrolled()(problem, meta, batch).grads
    assert _rel(fo, full) > 1e-6  # the dropped terms matter ...
    assert (
        torch.nn.functional.cosine_similarity(_flat(fo), _flat(full), dim=0) > 0.5
    )  # ... but it points the same way


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """Opt-in torch.compile of the fully functional grad(vmap(grad)) step (compiles ~1 min on
    CPU)."""
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["sgd"], k=2)
    problem.model.float()
    problem.loss.float()
    batch = type(batch)(
        {k: v.float() for k, v in batch.theta0.items()}, *(t.float() for t in batch[1:])
    )
    meta = meta_params(problem.loss)
    eager = Unrolled()(problem, meta, batch)
    compiled = Unrolled(compile=True)(problem, meta, batch)
    assert _rel(compiled.grads, eager.grads) <= 1e-5
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)


def test_class_weighted_validation_objective_gets_its_context():
    """meta.objective=weighted_ce: the objective sees the validation class counts."""
    problem, batch = _problem(TaylorGLO(init="ce"), O.sgd(lr=0.5), task="digits")
    meta = meta_params(problem.loss)
    plain = Unrolled()(problem, meta, batch)
    problem.objective = fixed.weighted_ce
    problem.objective_context = {"class_counts": torch.tensor([50.0, 5, 5, 5, 5, 5, 5, 5, 5, 5])}
    weighted = Unrolled()(problem, meta, batch)
    assert not torch.allclose(weighted.loss, plain.loss)
    assert _rel(weighted.grads, HigherBackend()(problem, meta, batch).grads) <= 1e-6


def test_es_estimate_points_along_the_true_hypergradient():
    from metaloss.hypergrad.es import EvolutionStrategies

    problem, batch = _problem(TaylorGLO(init="mse"), OPTS["sgd"], k=2)
    meta = meta_params(problem.loss)
    exact = Unrolled()(problem, meta, batch)
    es = EvolutionStrategies(population=200, sigma=1e-3)(problem, meta, batch)
    assert torch.nn.functional.cosine_similarity(_flat(es.grads), _flat(exact.grads), dim=0) > 0.9
    torch.testing.assert_close(es.loss, exact.loss, rtol=1e-3, atol=1e-6)


def test_es_can_optimise_the_error_rate():
    from metaloss.hypergrad.es import EvolutionStrategies

    problem, batch = _problem(TaylorGLO(init="ce"), O.sgd(lr=0.5), task="digits")
    out = EvolutionStrategies(population=4, sigma=0.1, objective="error")(
        problem, meta_params(problem.loss), batch
    )
    assert 0.0 <= out.loss <= 1.0 and all(torch.isfinite(g).all() for g in out.grads.values())
    with pytest.raises(ValueError, match="unknown ES objective"):
        EvolutionStrategies(objective="accuracy")

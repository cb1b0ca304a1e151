"""ES evaluates its population (2P candidates × T tasks) as one vmap: the estimate equals
the reference loop over candidates (same noise, same order), chunked or not, on the true
0-1 error too; it stays linear in the per-task objectives (what `Sharded` relies on); a
loss that cannot run under vmap falls back to the loop with a warning; and a real
`hypergrad=es` run still resumes bit-identically."""

import warnings

import pytest
import torch
from test_hypergrad import OPTS, _flat, _problem
from test_interruption import TINY, _assert_identical, _state

from metaloss.cli import meta as meta_app
from metaloss.hypergrad.base import MetaBatch, meta_params
from metaloss.hypergrad.es import EvolutionStrategies
from metaloss.inner import optimizers as O
from metaloss.losses.mlp import ML3Loss
from metaloss.losses.taylor import TaylorGLO
from metaloss.meta import MetaLearner
from metaloss.validate import ConfigError


def _assert_same_estimate(a, b):
    torch.testing.assert_close(_flat(a.grads), _flat(b.grads), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", [None, 1, 4, 7])
def test_vmapped_population_equals_the_loop_on_ml3_sine(chunk):
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["sgd"], k=3)
    meta = meta_params(problem.loss)
    loop = EvolutionStrategies(population=5, sigma=0.05, seed=3, vectorize=False)
    vec = EvolutionStrategies(population=5, sigma=0.05, seed=3, chunk=chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the loop
        for _ in range(2):  # the second call draws new noise (call counter), still equal
            a, b = loop(problem, meta, batch), vec(problem, meta, batch)
            _assert_same_estimate(a, b)
            assert _flat(b.grads).norm() > 0
    assert loop.state_dict() == vec.state_dict() == {"calls": 2}


@pytest.mark.parametrize("chunk", [None, 3])
def test_vmapped_population_equals_the_loop_on_the_error_rate(chunk):
    problem, batch = _problem(TaylorGLO(init="ce"), O.sgd(lr=0.5), task="digits")
    meta = meta_params(problem.loss)
    kw = dict(population=4, sigma=0.3, objective="error")
    a = EvolutionStrategies(vectorize=False, **kw)(problem, meta, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        b = EvolutionStrategies(chunk=chunk, **kw)(problem, meta, batch)
    _assert_same_estimate(a, b)
    assert 0.0 <= b.loss <= 1.0 and _flat(b.grads).norm() > 0  # the 0-1 error moved


def test_estimate_is_linear_in_the_per_task_objectives_with_the_same_noise():
    """What `Sharded` needs: each rank's share, weighted, sums to the full estimate."""
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["sgd"], k=2)
    meta = meta_params(problem.loss)
    es = EvolutionStrategies(population=3, sigma=0.05, chunk=2)
    full = es(problem, meta, batch)
    n, parts = batch.x_train.shape[0], [(0, 1), (1, 4)]
    grads, loss = {k: torch.zeros_like(v) for k, v in full.grads.items()}, 0.0
    for lo, hi in parts:
        es.load_state_dict({"calls": 0})  # every rank is at the same call
        part = MetaBatch(
            {k: v[lo:hi] for k, v in batch.theta0.items()}, *(t[lo:hi] for t in batch[1:])
        )
        hg = es(problem, meta, part)
        loss = loss + hg.loss * (hi - lo) / n
        grads = {k: grads[k] + hg.grads[k] * (hi - lo) / n for k in grads}
    torch.testing.assert_close(_flat(grads), _flat(full.grads), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, full.loss, rtol=1e-12, atol=1e-14)


class _ItemLoss(torch.nn.Module):
    """A learnable scaled MSE that reads a Python float from its parameter: fine in a loop,
    impossible under vmap (``.item()`` of a batched tensor)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, pred, target, **_):
        gate = float(self.scale.item() != 0.0)  # a Python-level branch on φ's value
        return gate * self.scale * (pred - target).pow(2).reshape(pred.shape[0], -1).mean(-1)


def test_a_loss_that_cannot_run_under_vmap_falls_back_to_the_loop_with_a_warning():
    problem, batch = _problem(_ItemLoss(), OPTS["sgd"], k=2)
    meta = meta_params(problem.loss)
    a = EvolutionStrategies(population=3, sigma=0.05, vectorize=False)(problem, meta, batch)
    es = EvolutionStrategies(population=3, sigma=0.05)
    with pytest.warns(RuntimeWarning, match="_ItemLoss.*mse.*falling back"):
        b = es(problem, meta, batch)
    _assert_same_estimate(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once, not at every step
        es(problem, meta, batch)


def test_a_diverged_candidate_counts_as_the_worst_not_as_nan(monkeypatch):
    """With the true error rate, a diverged candidate is NaN (not a guess): it must not make the
    whole estimate NaN (every such step skipped, then the run stopped), only rank worst."""
    problem, batch = _problem(ML3Loss(hidden=(8,)), OPTS["sgd"], k=2)
    meta = meta_params(problem.loss)
    nan = float("nan")
    with_nan = torch.tensor([0.3, nan, 0.2, 0.1, 0.5, 0.4], dtype=torch.float64)
    replaced = torch.tensor([0.3, 0.5, 0.2, 0.1, 0.5, 0.4], dtype=torch.float64)
    out = {}
    for name, values in (("nan", with_nan), ("replaced", replaced), ("all", torch.full((6,), nan))):
        es = EvolutionStrategies(population=3, sigma=0.05)
        monkeypatch.setattr(es, "_evaluate", lambda *a, values=values: values)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[name] = es(problem, meta, batch)
        assert any("1 of 6 candidates diverged" in str(w.message) for w in caught) == (
            name == "nan"
        )
    _assert_same_estimate(out["nan"], out["replaced"])
    assert torch.isfinite(_flat(out["nan"].grads)).all()
    assert torch.isnan(out["all"].loss)  # nothing finite: the step is skipped by the learner
    cause, finding, fix = es.diagnosis()  # and ES says why
    assert (
        cause == "es" and "every one of the 6 ES candidates" in finding and "hypergrad.sigma" in fix
    )


def test_every_candidate_diverging_is_blamed_on_sigma_when_phi_itself_trains(compose_cfg, tmp_path):
    """Before: the streak of all-diverged populations was blamed on the INNER learning rate.
    φ itself trains finitely, only φ ± σε do not: the run stops naming hypergrad.sigma."""
    from metaloss.meta import NonFiniteMetaGradient

    cfg = compose_cfg(
        "meta",
        TINY
        + [
            "hypergrad=es",
            "hypergrad.population=2",
            "hypergrad.sigma=1e30",
            "meta.max_bad_steps=2",
            "meta.steps=3",
            "meta_test.enabled=false",
        ],
    )
    with pytest.raises(
        NonFiniteMetaGradient, match="every one of the 4 ES candidates.*hypergrad.sigma"
    ) as err:
        meta_app.run(cfg, tmp_path, "ml3")
    assert err.value.cause == "es" and "INNER" not in str(err.value)
    assert not (tmp_path / "learned_loss.pt").exists()


def test_an_error_rate_objective_on_a_regression_task_is_refused_before_compute(
    compose_cfg, tmp_path
):
    cfg = compose_cfg(
        "meta", TINY + ["hypergrad=es", "hypergrad.objective=error"]
    )  # sine: regression
    with pytest.raises(
        ConfigError,
        match=r"hypergrad.objective = 'error': means nothing for regression task "
        r"'sine' \(it is for classification / binary tasks\); valid for "
        r"regression: null \(meta.objective\)$",
    ):
        meta_app.run(cfg, tmp_path, "ml3")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_invalid_chunk_is_rejected():
    with pytest.raises(ValueError, match="chunk"):
        EvolutionStrategies(chunk=0)


def test_vmapped_es_run_resumes_bit_identically(compose_cfg, tmp_path, interrupted_then_resumed):
    """tests/test_interruption.py's worst moment (Ctrl-C after step 3's update), with a
    chunked vmapped population: the resumed run's φ equals an uninterrupted one's."""
    overrides = TINY + [
        "hypergrad=es",
        "hypergrad.population=3",
        "hypergrad.chunk=4",
        "meta_optim.lr=0.05",
        "meta.steps=5",
    ]
    straight, broken, ckpt = interrupted_then_resumed(overrides, MetaLearner, "ml3")
    assert ckpt["step"] < 5 and ckpt["hypergrad"]["calls"] == ckpt["step"]
    _assert_identical(_state(straight), _state(broken))
    # and the vmapped run took the same path as the loop would have
    loop = tmp_path / "loop"
    meta_app.run(
        compose_cfg("meta", overrides[:-1] + ["hypergrad.vectorize=false", "meta.steps=5"]),
        loop,
        "ml3",
    )
    for k, v in _state(loop).items():
        torch.testing.assert_close(v, _state(straight)[k], rtol=1e-5, atol=1e-6)

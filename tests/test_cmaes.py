"""meta_optim=cmaes: CMA-ES over φ on true (non-differentiable) validation metrics, resumed
bit-identically from a checkpoint that holds only tensors (replayed, never unpickled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from metaloss.checkpoint import CorruptCheckpoint
from metaloss.cli import meta as meta_app
from metaloss.cmaes import CMAES, OBJECTIVES
from metaloss.config import instantiate_loss
from metaloss.hypergrad.base import MetaProblem, batched_objective
from metaloss.losses.taylor import TaylorGLO
from metaloss.metrics import evaluate
from metaloss.sampling import sample_meta_batch
from metaloss.train import build_model
from metaloss.validate import ConfigError

TINY = [
    "loss=taylorglo",
    "task=digits",
    "meta_optim=cmaes",
    "logger=none",
    "progress=false",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "meta.plot_every=100",
    "meta.checkpoint_every=100",
    "meta_test.enabled=false",
    "meta_optim.popsize=4",
]


def _state(run_dir):
    return torch.load(run_dir / "learned_loss.pt", weights_only=True)["state_dict"]


# ---------------------------------------------------------------- the objectives


@pytest.mark.parametrize("kind", ["classification", "binary", "segmentation"])
def test_objectives_are_one_minus_the_reported_metrics(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "classification":
        out, y = (
            torch.randn(60, 5, generator=g),
            torch.randint(0, 4, (60,), generator=g),
        )  # class 4 absent
        pairs = {"error": "acc", "balanced_error": "balanced_acc", "macro_f1_loss": "macro_f1"}
    elif kind == "binary":
        out, y = torch.randn(50, generator=g), torch.randint(0, 2, (50,), generator=g)
        pairs = {"error": "acc", "balanced_error": "balanced_acc", "macro_f1_loss": "macro_f1"}
    else:
        out = torch.randn(6, 1, 5, 5, generator=g)
        y = (torch.rand(6, 1, 5, 5, generator=g) > 0.6).float()
        y[0], out[0] = 0, -1  # empty mask, empty prediction: IoU 1
        pairs = {"iou_loss": "iou"}
    ref = evaluate(kind, out, y, num_classes=5 if kind == "classification" else None, prefix="v")
    for name, metric in pairs.items():
        got = OBJECTIVES[name](out, y).mean()
        assert got.item() == pytest.approx(1 - ref[f"v/{metric}"], abs=1e-6), name
        # and under vmap (candidates x tasks): no data-dependent control flow
        batched = torch.vmap(lambda o, name=name: OBJECTIVES[name](o, y).mean())(
            torch.stack([out, -out])
        )
        assert batched[0].item() == pytest.approx(got.item(), abs=1e-6)


@pytest.mark.parametrize("kind", ["classification", "binary", "segmentation"])
def test_a_diverged_model_has_no_metric_not_a_guess(kind):
    """argmax / thresholding of NaN predictions still names a class: the balanced error of a
    NaN binary model used to be 0.5 (every example "class 0"), better than many trained ones."""
    y = {
        "classification": torch.tensor([0, 1, 2, 1]),
        "binary": torch.tensor([0, 0, 0, 1]),
        "segmentation": torch.ones(4, 1, 3, 3),
    }[kind]
    shape = {"classification": (4, 3), "binary": (4,), "segmentation": (4, 1, 3, 3)}[kind]
    names = ["iou_loss"] if kind == "segmentation" else ["error", "balanced_error", "macro_f1_loss"]
    good, bad = torch.zeros(shape), torch.full(shape, float("nan"))
    for name in names:
        both = torch.vmap(lambda o, name=name: OBJECTIVES[name](o, y).mean())(
            torch.stack([good, bad])
        )
        assert torch.isfinite(both[0]) and torch.isnan(both[1]), name
    half = good.clone()
    half[1] = float("inf")  # one diverged row: the per-example error is NaN there only
    if kind == "classification":
        assert OBJECTIVES["error"](half, y).isnan().tolist() == [False, True, False, False]
    metrics = evaluate(kind, bad, y, num_classes=3 if kind == "classification" else None)
    assert metrics and all(np.isnan(v) for v in metrics.values())


# ---------------------------------------------------------------- the learner on a real problem


def _digits_problem(compose_cfg, inner_steps=20):
    cfg = compose_cfg("meta", TINY + ["loss.init=zeros", "model.hidden=[32]", "optim.lr=1.0"])
    task = instantiate(cfg.task)
    loss = instantiate_loss(cfg.loss, task)
    factory = instantiate(cfg.model)
    problem = MetaProblem(
        build_model(factory, task, 0),
        loss,
        instantiate(cfg.optim),
        inner_steps,
        OBJECTIVES["error"],
    )
    batch = sample_meta_batch(
        [task],
        factory,
        n_tasks=2,
        inner_steps=inner_steps,
        inner_batch=128,
        val_batch=None,
        gen=torch.Generator().manual_seed(0),
    )
    return loss, problem, batch


def test_cmaes_lowers_the_true_validation_error_of_taylorglo_on_digits(compose_cfg):
    """From φ = 0 (the loss trains nothing: chance error) CMA-ES finds a φ that trains."""
    loss, problem, batch = _digits_problem(compose_cfg)
    learner = CMAES(
        loss, sigma0=1.0, popsize=8, seed=0, objective="error", task_kind="classification"
    )
    before = {k: v.detach().clone() for k, v in learner.params.items()}
    with torch.no_grad():
        start = float(batched_objective(problem, learner.params, batch))
    metrics = [learner.step(problem, None, batch) for _ in range(8)]
    with torch.no_grad():
        end = float(batched_objective(problem, learner.params, batch))
    assert start > 0.8  # nothing learnt
    assert not learner._no_vmap  # the population ran as one vmap over candidates x tasks
    assert end < start - 0.1, (start, end, metrics)  # at CMA's mean (measured: 0.90 -> 0.67)
    assert min(m["meta/best_objective"] for m in metrics) < start - 0.3  # best candidate (0.32)
    assert any(not torch.equal(before[k], v) for k, v in learner.params.items())
    assert all(0 <= m["meta/best_objective"] <= m["meta/val_objective"] <= 1 for m in metrics)
    assert torch.equal(
        torch.as_tensor(learner.mean, dtype=torch.float32),
        torch.cat([v.detach().reshape(-1) for v in learner.params.values()]),
    )


def test_vmap_over_candidates_equals_the_loop(compose_cfg):
    loss, problem, batch = _digits_problem(compose_cfg, inner_steps=2)
    a = CMAES(loss, sigma0=0.5, popsize=4, objective="macro_f1_loss")
    fa = a.step(problem, None, batch)
    b = CMAES(TaylorGLO(init="zeros"), sigma0=0.5, popsize=4, objective="macro_f1_loss")
    b._no_vmap = True
    fb = b.step(problem, None, batch)
    assert fa["meta/val_objective"] == pytest.approx(fb["meta/val_objective"], abs=1e-6)


def test_sampling_is_private_and_leaves_numpy_global_rng_alone():
    """Candidates come from a private RNG: other users of np.random neither change them nor
    are changed by them."""

    def run(disturb: bool):
        learner = CMAES(TaylorGLO(), sigma0=0.3, popsize=6, seed=3)
        for _ in range(4):
            if disturb:
                np.random.rand(17)
            learner._ask_tell(lambda c: (c**2).sum(1).tolist())
        return learner.mean

    np.random.seed(123)
    expected_next = np.random.RandomState(123).rand()
    a = run(False)
    assert np.random.rand() == expected_next  # cma's seeding and sampling did not touch it
    assert np.array_equal(a, run(True))


# ---------------------------------------------------------------- the app, resume, safety


def test_metaloss_meta_with_cmaes_runs_and_moves_phi(compose_cfg, tmp_path):
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=3"]), tmp_path, "taylorglo")
    phi = _state(tmp_path)
    init = TaylorGLO().state_dict()
    assert any(not torch.equal(phi[k], init[k]) for k in init)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["learner"]["fitness"].shape == (3, 4)
    assert (
        (ckpt["learner"]["fitness"] >= 0) & (ckpt["learner"]["fitness"] <= 1)
    ).all()  # true error rates


def test_interrupt_after_an_update_but_before_its_step_completes(interrupted_then_resumed):
    straight, broken, ckpt = interrupted_then_resumed(TINY + ["meta.steps=5"], CMAES, "taylorglo")
    assert ckpt["step"] == 2
    a, b = _state(straight), _state(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(straight / "checkpoint.pt", weights_only=True)["learner"]
    cb = torch.load(broken / "checkpoint.pt", weights_only=True)["learner"]
    for k in ("fitness", "mean", "sigma", "C"):
        assert torch.equal(ca[k], cb[k]), k


def test_the_checkpoint_holds_only_tensors_and_a_tampered_one_is_refused(compose_cfg, tmp_path):
    """Nothing is unpickled beyond weights_only's tensors and containers, so a checkpoint
    cannot run code; a state that replay does not reproduce is refused, not continued."""
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), tmp_path, "taylorglo")
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(x=v)
        else:
            yield x

    for leaf in leaves(ckpt["learner"]):
        assert isinstance(leaf, torch.Tensor | int | str), type(leaf)
        assert not (isinstance(leaf, torch.Tensor) and leaf.dtype == torch.uint8)  # no pickle bytes

    class Boom:  # what a malicious pickle would carry
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    evil = dict(ckpt, learner=dict(ckpt["learner"], extra=Boom()))
    torch.save(evil, path)
    with pytest.raises(CorruptCheckpoint, match="cannot read"):
        meta_app.run(compose_cfg("meta", TINY + ["meta.steps=3"]), tmp_path, "taylorglo")

    ckpt["learner"]["fitness"][1, 0] += 0.25  # another history than the stored mean's
    torch.save(ckpt, path)
    with pytest.raises(CorruptCheckpoint, match="did not reproduce"):
        meta_app.run(compose_cfg("meta", TINY + ["meta.steps=3"]), tmp_path, "taylorglo")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["meta.learn_inner_lr=true"], "learn_inner_lr"),
        (["meta.mode=online"], "meta.mode"),
        (["meta.objective=ce", "meta_optim.objective=error"], "optimises one"),
        (["meta_optim.objective=accuracy"], "meta_optim.objective"),
        (["meta_optim.sigma0=0"], "meta_optim.sigma0"),
        (["meta_optim.objective=iou_loss"], "segmentation"),
    ],
)
def test_settings_that_make_no_sense_are_refused(compose_cfg, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        meta_app.run(compose_cfg("meta", TINY + ["meta.steps=1", *extra]), tmp_path, "taylorglo")
    assert not (tmp_path / "checkpoint.pt").exists()


# ---------------------------------------------------------------- outer loops that fail say so


def test_every_candidate_diverging_stops_the_run_with_a_diagnosis(compose_cfg, tmp_path):
    """Before: a generation in which every candidate diverged was told a flat fitness and the
    run went on to save learned_loss.pt with complete: true. Now such a generation is skipped,
    and meta.max_bad_steps of them in a row stop the run, naming the inner lr."""
    from metaloss.losses.io import load_learned_loss
    from metaloss.meta import NonFiniteMetaGradient

    cfg = compose_cfg("meta", TINY + ["meta.steps=4", "meta.max_bad_steps=2", "optim.lr=1e30"])
    with pytest.raises(
        NonFiniteMetaGradient, match="no candidate with a finite objective.*INNER.*optim.lr"
    ) as err:
        meta_app.run(cfg, tmp_path, "taylorglo")
    assert err.value.cause == "inner"
    assert not (tmp_path / "learned_loss.pt").exists()
    good = load_learned_loss(tmp_path / "learned_loss_last_good.pt")
    assert good.meta["complete"] is False
    init = TaylorGLO().state_dict()  # no generation was told: φ is still the initial one
    assert all(torch.equal(good.state_dict()[k], init[k]) for k in init)


def test_a_run_too_short_to_reach_max_bad_steps_is_still_not_complete(compose_cfg, tmp_path):
    """Every generation diverged but meta.steps < meta.max_bad_steps: no φ was produced, so
    the end of the run refuses to call it complete."""
    from metaloss.meta import NonFiniteMetaGradient

    cfg = compose_cfg("meta", TINY + ["meta.steps=2", "meta.max_bad_steps=20", "optim.lr=1e30"])
    with pytest.raises(NonFiniteMetaGradient, match="every one of the 2 outer steps") as err:
        meta_app.run(cfg, tmp_path, "taylorglo")
    assert err.value.cause == "inner" and not (tmp_path / "learned_loss.pt").exists()


def test_a_step_size_too_wide_for_the_stable_region_names_sigma0(compose_cfg):
    """The mean φ trains finitely, every candidate around it diverges: σ is to blame."""
    from metaloss.meta import NonFiniteMetaGradient

    loss, problem, batch = _digits_problem(compose_cfg)
    learner = CMAES(
        loss,
        sigma0=1e12,
        popsize=4,
        seed=0,
        objective="error",
        task_kind="classification",
        max_bad_steps=2,
    )
    x0 = learner.mean.copy()
    learner.step(problem, None, batch)
    assert learner.skipped == 1 and learner.updates == 0 and np.array_equal(learner.mean, x0)
    with pytest.raises(NonFiniteMetaGradient, match="meta_optim.sigma0") as err:
        learner.step(problem, None, batch)
    assert err.value.cause == "sigma"


def test_a_skipped_generation_replays_exactly_on_resume(compose_cfg, monkeypatch):
    """A generation with no finite candidate is asked but not told: a NaN row in the fitness
    table, replayed as such, so resume reproduces mean, σ and C bit for bit."""
    loss, problem, batch = _digits_problem(compose_cfg, inner_steps=1)
    learner = CMAES(
        loss, sigma0=0.5, popsize=4, seed=1, objective="error", task_kind="classification"
    )
    real = learner._evaluate
    calls = {"n": 0}

    def sometimes_all_nan(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return torch.full_like(out, float("nan")) if calls["n"] == 2 else out

    monkeypatch.setattr(learner, "_evaluate", sometimes_all_nan)
    for _ in range(3):
        learner.step(problem, None, batch)
    assert learner.skipped == 1 and learner.updates == 2 and learner.bad_steps == 0
    state = learner.state_dict()
    assert torch.isnan(state["fitness"][1]).all() and torch.isfinite(state["fitness"][[0, 2]]).all()
    again = CMAES(
        TaylorGLO(), sigma0=0.5, popsize=4, seed=1, objective="error", task_kind="classification"
    )
    again.load_state_dict(state)  # raises if the replay does not reproduce mean, σ, C
    assert np.array_equal(again.mean, learner.mean) and again.skipped == 1


def test_cmaes_objective_for_another_task_kind_is_refused_naming_key_value_and_valid(
    compose_cfg, tmp_path
):
    cfg = compose_cfg("meta", [*TINY, "task=sine", "meta.steps=1", "meta_optim.objective=error"])
    with pytest.raises(
        ConfigError,
        match=r"meta_optim.objective = 'error': means nothing for regression.*"
        r"valid for regression: null",
    ):
        meta_app.run(cfg, tmp_path, "taylorglo")
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_the_console_script_exits_nonzero_when_every_candidate_diverged(tmp_path):
    """As a user runs it: non-zero exit, the diagnosis on stderr, no complete learned_loss.pt."""
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            Path(sys.executable).parent / "metaloss-meta",
            *TINY,
            "meta.steps=2",
            "optim.lr=1e30",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "no step produced a φ" in proc.stderr, proc.stderr[-3000:]
    assert "optim.lr" in proc.stderr
    assert (
        not (run_dir / "learned_loss.pt").exists()
        and (run_dir / "learned_loss_last_good.pt").exists()
    )

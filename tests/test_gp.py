"""meta_optim=gp: genetic programming over symbolic losses (metaloss.gp) — batched fitness
equal to one-at-a-time training, a search that recovers squared error, exact resume by
replay, and settings refused before anything runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hydra.utils import instantiate

from metaloss.checkpoint import CorruptCheckpoint
from metaloss.cli import meta as meta_app
from metaloss.cmaes import OBJECTIVES
from metaloss.config import instantiate_loss
from metaloss.gp import GeneticProgramming, population_objective, sequential_objective
from metaloss.hypergrad.base import MetaProblem
from metaloss.losses import fixed
from metaloss.losses import symbolic as sym
from metaloss.losses.io import load_learned_loss
from metaloss.sampling import sample_meta_batch
from metaloss.train import build_model
from metaloss.validate import ConfigError

TINY = [
    "loss=symbolic",
    "loss.expression='mul(-1.0, mul(y, log(f)))'",
    "task=digits",
    "meta_optim=gp",
    "meta_optim.popsize=4",
    "meta_optim.generations=3",
    "logger=none",
    "progress=false",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "meta.plot_every=100",
    "meta.checkpoint_every=100",
    "meta_test.enabled=false",
]


def _problem(compose_cfg, overrides, inner_steps, objective):
    cfg = compose_cfg("meta", TINY + overrides)
    task = instantiate(cfg.task)
    loss = instantiate_loss(cfg.loss, task)
    factory = instantiate(cfg.model)
    problem = MetaProblem(
        build_model(factory, task, 0), loss, instantiate(cfg.optim), inner_steps, objective
    )
    batch = sample_meta_batch(
        [task],
        factory,
        n_tasks=3,
        inner_steps=inner_steps,
        inner_batch=32,
        val_batch=None,
        gen=torch.Generator().manual_seed(0),
    )
    return loss, problem, batch


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_batched_fitness_equals_training_one_candidate_and_seed_at_a_time(compose_cfg, optim):
    """All P × T models in one loop give the fitness each tree gets trained alone, a tree
    whose training diverges included (NaN in both, and it does not spill into the others)."""
    loss, problem, batch = _problem(
        compose_cfg, [f"optim={optim}", "optim.lr=0.5"], 4, OBJECTIVES["error"]
    )
    trees = [sym.parse(t) for t in (sym.CROSS_ENTROPY, "square(sub(f, y))", "div(y, f)")]
    trees.append(sym.parse("mul(-1e30, mul(1e30, mul(y, f)))"))  # overflows: diverges
    batched = population_objective(problem, trees, batch)
    one_by_one = sequential_objective(problem, trees, batch)
    assert torch.isfinite(batched[:3]).all() and torch.isnan(batched[3])
    assert torch.isnan(one_by_one[3])
    assert torch.allclose(batched[:3], one_by_one[:3], atol=1e-6)


def test_a_generation_draws_only_trees_that_pass_the_shape_checks_and_fit_the_limits():
    gp = GeneticProgramming(
        sym.SymbolicLoss(sym.CROSS_ENTROPY, max_nodes=15, max_constants=3),
        popsize=30,
        seed=1,
        max_depth=4,
    )
    for _ in range(3):
        gp._breed(torch.rand(30).double().numpy())
        for tree in gp.population:
            assert sym.shape_problem(tree, "classification") is None
            assert len(tree) <= 15 and sym.n_constants(tree) <= 3 and sym.depth(tree) <= 4
    assert gp.population[0] in [list(t) for t in gp.population]  # elitism keeps one


def _gradient_in_f(tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual f - y, ∂loss/∂f) on a grid of targets and residuals."""
    fn, c = sym.compile_tokens(tokens)
    y = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[:, None].expand(3, 41)
    r = torch.linspace(-2, 2, 41, dtype=torch.float64).expand(3, 41)
    f = (y + r).requires_grad_(True)
    (g,) = torch.autograd.grad(fn(y, f, c).sum(), f)
    return r.reshape(-1), g.reshape(-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_search_recovers_squared_error_on_clean_gaussian_regression(
    compose_cfg, tmp_path, seed
):
    """From absolute error, on regression with Gaussian noise (MSE's own setting), the search
    ends at squared error up to terms that do not change its gradient: ∂loss/∂f = c (f − y)
    with c > 0 (seed 0 finds (f − y)², seed 1 (f − y)² − sign(|f − y|)²)."""
    cfg = compose_cfg(
        "meta",
        [
            "task=outliers",
            "task.fraction=0.0",
            "model=mlp",
            "model.hidden=[16]",
            "loss=symbolic",
            "loss.expression='abs(sub(f, y))'",
            "meta_optim=gp",
            "meta_optim.popsize=24",
            "meta_optim.generations=12",
            "optim=sgd",
            "optim.lr=0.05",
            "meta.steps=12",
            "meta.tasks_per_step=8",
            "meta.inner_steps=30",
            "meta.inner_batch=32",
            "meta_test.enabled=false",
            "logger=none",
            "progress=false",
            f"seed={seed}",
        ],
    )
    meta_app.run(cfg, tmp_path, "symbolic")
    found = load_learned_loss(tmp_path / "learned_loss.pt").tokens()
    r, g = _gradient_in_f(found)
    scale = float((g * r).sum() / (r * r).sum())  # least squares g ≈ scale · r
    assert scale > 0, sym.pretty(found)
    assert torch.allclose(g, scale * r, atol=1e-6 * scale), sym.pretty(found)
    assert sym.to_text(found) != "abs(sub(f, y))"


def test_metaloss_meta_with_gp_logs_the_trees_and_refines_the_best_ones_constants(
    compose_cfg, tmp_path
):
    """3 generations, then 2 gradient steps on the best tree's constants."""
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=5"]), tmp_path, "symbolic")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    learner = ckpt["learner"]
    assert ckpt["step"] == 5 and learner["fitness"].shape == (3, 4)
    assert ((learner["fitness"] >= 0) & (learner["fitness"] <= 1)).all()  # true error rates
    found = load_learned_loss(tmp_path / "learned_loss.pt")
    assert sym.shape_problem(found.tokens(), "classification") is None
    if sym.n_constants(found.tokens()):  # refined, else nothing to refine (and said so)
        assert learner["refiner"]["counters"]["updates"] == 2
    else:
        assert learner["refiner"] is None and "no constants" in learner["refine_stopped"]


def _gp_after_one_generation(compose_cfg, trees):
    """A GP whose first generation is ``trees``, told its fitness on a real problem."""
    loss, problem, batch = _problem(compose_cfg, ["optim.lr=0.5"], 3, OBJECTIVES["error"])
    gp = GeneticProgramming(
        loss, popsize=len(trees), generations=1, seed=0, refine_lr=0.05, tournament=2
    )
    gp.population = [sym.parse(t) for t in trees]
    gp.step(problem, None, batch)
    return gp, problem, batch


def test_after_the_generations_the_best_trees_constants_are_refined_by_hypergradients(
    compose_cfg,
):
    from metaloss.hypergrad.unrolled import Unrolled

    trees = ["mul(-1.0, mul(y, log(f)))", "mul(-0.5, mul(y, log(f)))", "mul(-2.0, mul(y, f))"]
    gp, problem, batch = _gp_after_one_generation(compose_cfg, trees)
    before = gp.loss.tokens()
    assert sym.to_text(before) in trees
    problem = dataclasses.replace(problem, objective=fixed.ce)
    metrics = [gp.step(problem, Unrolled(), batch) for _ in range(3)]
    assert all("meta/grad_norm" in m for m in metrics)
    assert gp.refiner is not None and gp.refiner.updates == 3
    after = gp.loss.tokens()
    assert [t for t in after if isinstance(t, str)] == [t for t in before if isinstance(t, str)]
    assert [t for t in after if isinstance(t, float)] != [t for t in before if isinstance(t, float)]
    assert gp.finish() is None


def test_a_refinement_that_diverges_keeps_the_searchs_best_tree(compose_cfg, monkeypatch):
    """The search found a tree; the refinement's hypergradients are never finite: φ stays the
    search's best tree and finish() says so (the run used to fail with no learned loss)."""
    from metaloss.meta import MetaLearner, NonFiniteMetaGradient

    gp, problem, batch = _gp_after_one_generation(
        compose_cfg, ["mul(-1.0, mul(y, log(f)))", "mul(-2.0, mul(y, f))"]
    )
    best = gp.loss.tokens()

    def never_finite(self, *a, **k):
        raise NonFiniteMetaGradient("20 consecutive outer steps gave NaN", "meta")

    monkeypatch.setattr(MetaLearner, "step", never_finite)
    assert gp.step(problem, None, batch) == {} and gp.step(problem, None, batch) == {}
    assert gp.loss.tokens() == best
    assert "the refinement diverged" in gp.finish()
    assert gp.state_dict()["refine_stopped"] == gp.refine_stopped  # resumed runs stay stopped


def test_the_tree_table_reaches_wandb(compose_cfg, tmp_path):
    """The per-generation table of best trees is a W&B table of the run (offline, read back)."""
    meta_app.run(
        compose_cfg("meta", TINY + ["meta.steps=3", "logger=wandb", "logger.mode=offline"]),
        tmp_path,
        "symbolic",
    )
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/meta/gp_trees_*.json"))
    assert tables, "no gp_trees table written"
    last = max(tables, key=lambda p: p.stat().st_mtime)
    data = json.loads(last.read_text())
    assert data["columns"] == ["generation", "rank", "fitness", "nodes", "expression", "simplified"]
    assert {row[0] for row in data["data"]} == {0, 1, 2}
    for row in data["data"]:
        sym.parse(row[4])  # every logged expression reads back


@pytest.mark.parametrize("generations", [4, 2])  # interrupted while evolving / while refining
def test_an_interrupted_search_resumes_to_the_same_result(interrupted_then_resumed, generations):
    straight, broken, ckpt = interrupted_then_resumed(
        TINY + ["meta.steps=5", f"meta_optim.generations={generations}"],
        GeneticProgramming,
        "symbolic",
    )
    assert ckpt["step"] == 2
    a = torch.load(straight / "learned_loss.pt", weights_only=True)
    b = torch.load(broken / "learned_loss.pt", weights_only=True)
    assert a["init_kwargs"] == b["init_kwargs"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ca = torch.load(straight / "checkpoint.pt", weights_only=True)["learner"]
    cb = torch.load(broken / "checkpoint.pt", weights_only=True)["learner"]
    for k in ("fitness", "population", "constants"):
        assert torch.equal(ca[k], cb[k]), k


def test_a_checkpoint_whose_replay_does_not_reproduce_its_population_is_refused(
    compose_cfg, tmp_path
):
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), tmp_path, "symbolic")
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["learner"]["fitness"] = torch.flip(ckpt["learner"]["fitness"], [1])  # other ranks
    torch.save(ckpt, path)
    with pytest.raises(CorruptCheckpoint, match="did not reproduce"):
        meta_app.run(compose_cfg("meta", TINY + ["meta.steps=3"]), tmp_path, "symbolic")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["loss=taylorglo"], "needs loss=symbolic"),
        (["meta.learn_inner_lr=true"], "learn_inner_lr"),
        (["meta.mode=online"], "meta.mode"),
        (["meta_optim.generations=0"], "meta_optim.generations"),
        (["meta_optim.popsize=null"], "meta_optim.popsize = None: meta_optim=gp needs"),
        (["meta_optim.popsize=3"], "meta_optim.tournament = 4: must be <= 3"),
        (["meta_optim.elites=4"], "meta_optim.elites = 4: must be <= 3"),
        (["meta_optim.init_depth=7"], "meta_optim.init_depth = 7: must be <= meta_optim.max_depth"),
        (["loss.max_constants=0"], "loss.max_constants = 0: the expression has 1 constants"),
        (["meta_optim.crossover=1.5"], "meta_optim.crossover"),
        (["meta_optim.objective=iou_loss"], "segmentation"),
        (["loss.expression='mul(f, y)'"], "is no loss for classification: not lower"),
    ],
)
def test_settings_that_make_no_sense_are_refused(compose_cfg, tmp_path, extra, match):
    base = [o for o in TINY if not o.startswith("loss")] if "loss=taylorglo" in extra else TINY
    with pytest.raises(ConfigError, match=match):
        meta_app.run(compose_cfg("meta", base + ["meta.steps=3", *extra]), tmp_path, "symbolic")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_settings_that_leave_too_few_valid_trees_stop_with_the_settings_named():
    """Regression: no tree of depth 1 is a regression loss (sub(f, y) is not lower at the
    target); drawing the first generation used to loop forever."""
    with pytest.raises(ValueError, match="could draw only 1 of 4 trees.*init_depth = 1"):
        GeneticProgramming(
            sym.SymbolicLoss("square(sub(f, y))"), popsize=4, init_depth=1, task_kind="regression"
        )


def test_a_hand_edited_program_in_a_checkpoint_is_refused_on_resume(compose_cfg, tmp_path):
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=2"]), tmp_path, "symbolic")
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["learner"]["loss"]["program"][0] = 99.0  # not a node code
    torch.save(ckpt, path)
    with pytest.raises(CorruptCheckpoint, match="program code 99.0 is not a node code"):
        meta_app.run(compose_cfg("meta", TINY + ["meta.steps=3"]), tmp_path, "symbolic")


@pytest.mark.slow
def test_gp_quickstart_runs_end_to_end_as_a_console_script(tmp_path):
    """`metaloss-meta experiment=gp_quickstart`: search, refinement and meta-test."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "metaloss-meta"
    out = subprocess.run(
        [str(exe), "experiment=gp_quickstart", "logger=none", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert {"learned", "ce", "label_smoothing"} <= set(comparison["results"])
    found = load_learned_loss(tmp_path / "learned_loss.pt")
    assert sym.shape_problem(found.tokens(), "classification") is None

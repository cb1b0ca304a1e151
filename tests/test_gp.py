"""meta_optim=gp: genetic programming over symbolic losses (metaloss.gp) — batched fitness
equal to one-at-a-time training, a search that recovers squared error, exact resume by
replay, and settings refused before anything runs."""

from __future__ import annotations

import json

import pytest
import sympy
import torch
from hydra.utils import instantiate

from metaloss.checkpoint import CorruptCheckpoint
from metaloss.cli import meta as meta_app
from metaloss.cmaes import OBJECTIVES
from metaloss.config import instantiate_loss
from metaloss.gp import GeneticProgramming, population_objective, sequential_objective
from metaloss.hypergrad.base import MetaProblem
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


def test_the_search_recovers_squared_error_on_clean_gaussian_regression(compose_cfg, tmp_path):
    """From absolute error, on regression with Gaussian noise (MSE's own setting), the search
    ends at a tree that simplifies to c·(f − y)² (c > 0)."""
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
            "meta_optim.popsize=16",
            "meta_optim.generations=8",
            "optim=sgd",
            "optim.lr=0.05",
            "meta.steps=8",
            "meta.tasks_per_step=4",
            "meta.inner_steps=30",
            "meta.inner_batch=32",
            "meta_test.enabled=false",
            "logger=none",
            "progress=false",
        ],
    )
    meta_app.run(cfg, tmp_path, "symbolic")
    found = load_learned_loss(tmp_path / "learned_loss.pt")
    expr = sym.to_sympy(found.tokens())
    f, y = sympy.symbols("f y", real=True)
    ratio = sympy.simplify(expr / (f - y) ** 2)
    assert ratio.is_number and float(ratio) > 0, f"found {sym.pretty(found.tokens())}"


def test_metaloss_meta_with_gp_logs_the_trees_and_refines_the_best_ones_constants(
    compose_cfg, tmp_path
):
    """3 generations, then 2 gradient steps on the best tree's constants."""
    meta_app.run(compose_cfg("meta", TINY + ["meta.steps=5"]), tmp_path, "symbolic")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    learner = ckpt["learner"]
    assert ckpt["step"] == 5 and learner["fitness"].shape == (3, 4)
    assert ((learner["fitness"] >= 0) & (learner["fitness"] <= 1)).all()  # true error rates
    assert learner["refiner"]["counters"]["updates"] == 2
    found = load_learned_loss(tmp_path / "learned_loss.pt")
    assert sym.shape_problem(found.tokens(), "classification") is None


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
        (["meta_optim.crossover=1.5"], "meta_optim.crossover"),
        (["meta_optim.objective=iou_loss"], "segmentation"),
        (["loss.expression='mul(f, y)'"], "is no loss: not lower at the target"),
    ],
)
def test_settings_that_make_no_sense_are_refused(compose_cfg, tmp_path, extra, match):
    base = [o for o in TINY if not o.startswith("loss")] if "loss=taylorglo" in extra else TINY
    with pytest.raises(ConfigError, match=match):
        meta_app.run(compose_cfg("meta", base + ["meta.steps=3", *extra]), tmp_path, "symbolic")
    assert not (tmp_path / "checkpoint.pt").exists()


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

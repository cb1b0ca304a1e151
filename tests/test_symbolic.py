"""Symbolic losses (metaloss.losses.symbolic): a parser that never evaluates, trees that
compute the losses they name, the shape checks a search rejects candidates by, and a saved
tree that is checked like any other learned loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaloss.gp import GeneticProgramming
from metaloss.losses import symbolic as sym
from metaloss.losses.io import load_learned_loss, save_learned_loss
from metaloss.validate import ConfigError, check_config


def test_cross_entropy_and_squared_error_written_as_trees_are_those_losses():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 4, generator=g), torch.randint(0, 4, (7,), generator=g)
    ce = sym.SymbolicLoss(sym.CROSS_ENTROPY)
    assert torch.allclose(ce(logits, y), F.cross_entropy(logits, y, reduction="none"))
    z, b = torch.randn(9, generator=g), torch.randint(0, 2, (9,), generator=g)  # binary: 1 logit
    bce = F.binary_cross_entropy_with_logits(z, b.float(), reduction="none")
    assert torch.allclose(ce(z, b), bce, atol=1e-6)
    pred, target = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    se = sym.SymbolicLoss("square(sub(f, y))")
    assert torch.allclose(se(pred, target), ((pred - target) ** 2).mean(-1))
    assert se(pred, target).shape == (5,)


def test_text_and_tokens_round_trip_for_every_tree_a_search_draws():
    gp = GeneticProgramming(sym.SymbolicLoss(sym.CROSS_ENTROPY), popsize=40, seed=3)
    for tree in gp.population:
        assert sym.parse(sym.to_text(tree)) == tree
        program, consts = sym.encode(tree, 31, 8)
        assert sym.decode(sym.structure(torch.tensor(program)), consts) == tree
        assert sym.subtree_end(tree, 0) == len(tree)
    assert sym.depth(sym.parse("y")) == 0
    assert sym.depth(sym.parse("square(sub(f, y))")) == 2
    assert sym.depth(sym.parse("add(square(sub(f, y)), f)")) == 3


@pytest.mark.parametrize(
    "text, match",
    [
        ("mul(y)", "expected ','"),
        ("exp(y)", "unknown name 'exp'.*valid: terminals y, f"),
        ("__import__(os)", "unknown name '__import__'"),
        ("system('ls')", 'unexpected character "\'"'),
        ("y f", "after a complete expression"),
        ("add(y, f", "expected '\\)'"),
        ("1e999", "not finite"),
        ("y; f", "unexpected character ';'"),
        ("", "non-empty"),
    ],
)
def test_a_malformed_expression_is_refused_naming_what_is_wrong(text, match):
    with pytest.raises(sym.ExpressionError, match=match):
        sym.parse(text)


def test_an_expression_larger_than_max_nodes_is_refused():
    with pytest.raises(sym.ExpressionError, match="more than 3 nodes"):
        sym.SymbolicLoss("square(sub(f, y))", max_nodes=3)


@pytest.mark.parametrize(
    "text, kind, reason",
    [
        (sym.CROSS_ENTROPY, "classification", None),
        ("square(sub(f, y))", "classification", None),
        ("square(sub(f, y))", "regression", None),
        ("abs(sub(f, y))", "regression", None),
        ("y", "classification", "does not depend on the prediction"),
        ("add(f, 1.0)", "classification", "constant in the prediction"),  # Σ_c f_c = 1
        ("mul(f, y)", "classification", "not lower at the target"),  # rewards the wrong class
        ("div(1.0, sub(f, y))", "regression", "not lower at the target"),
        ("sub(f, f)", "regression", "constant"),
        ("mul(1e200, square(mul(1e200, sub(f, y))))", "regression", "not finite"),
        (sym.CROSS_ENTROPY, "segmentation", "not segmentation"),
    ],
)
def test_shape_checks_reject_what_cannot_be_a_loss(text, kind, reason):
    got = sym.shape_problem(sym.parse(text), kind)
    assert got == reason if reason is None else reason in got


def test_printing_simplifies_with_sympy():
    assert sym.pretty(sym.parse("square(sub(f, y))")) == "(f - y)**2"
    assert sym.pretty(sym.parse("add(mul(2.0, f), mul(3.0, f))")) == "5.0*f"


def test_a_saved_tree_loads_back_and_a_hand_edited_one_is_refused(tmp_path):
    loss = sym.SymbolicLoss("mul(-1.0, mul(y, log(f)))")
    loss.set_tokens(sym.parse("mul(0.7, square(sub(f, y)))"))  # as a search writes it
    path = save_learned_loss(loss, tmp_path / "l.pt", task="t", steps=1, complete=True)
    back = load_learned_loss(path)
    assert back.expression() == "mul(0.7, square(sub(f, y)))"
    assert back.init_kwargs["expression"] == back.expression()  # the file names the found tree
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    assert torch.equal(back(x, y), loss(x, y))

    raw = torch.load(path, weights_only=True)
    bad = dict(raw, state_dict=dict(raw["state_dict"], program=raw["state_dict"]["program"] * 0))
    torch.save(bad, tmp_path / "edited.pt")  # a program of y leaves only: not a tree
    with pytest.raises(Exception, match="complete tree|program"):
        load_learned_loss(tmp_path / "edited.pt")
    other = sym.SymbolicLoss("abs(sub(f, y))").state_dict()
    swapped = dict(raw, state_dict={"program": other["program"], "constants": torch.zeros(8)})
    torch.save(swapped, tmp_path / "swapped.pt")  # program and expression disagree
    with pytest.raises(Exception, match="is not the saved expression"):
        load_learned_loss(tmp_path / "swapped.pt")
    code = dict(
        raw, init_kwargs=dict(raw["init_kwargs"], expression="__import__('os').system('x')")
    )
    torch.save(code, tmp_path / "code.pt")  # an expression is parsed, never evaluated
    with pytest.raises(Exception, match="unexpected character|unknown name"):
        load_learned_loss(tmp_path / "code.pt")


def test_a_bad_expression_in_the_config_is_refused_before_anything_runs(compose_cfg):
    cfg = compose_cfg("train", ["loss=symbolic", "task=digits", "loss.expression='exp(f)'"])
    with pytest.raises(ConfigError, match="loss.expression: unknown name 'exp'"):
        check_config(cfg)


def test_the_gradient_learner_refines_a_trees_constants_through_the_engine(compose_cfg, tmp_path):
    """loss=symbolic meta_optim=adam: φ is the constants; the tree itself stays as written."""
    from metaloss.cli import meta as meta_app

    cfg = compose_cfg(
        "meta",
        [
            "loss=symbolic",
            "loss.expression='mul(-1.0, mul(y, log(add(f, 0.5))))'",
            "task=digits",
            "model.hidden=[8]",
            "meta.steps=3",
            "meta.tasks_per_step=2",
            "meta.inner_steps=2",
            "meta_optim.lr=0.1",
            "meta_test.enabled=false",
            "logger=none",
            "progress=false",
        ],
    )
    meta_app.run(cfg, tmp_path, "symbolic")
    loss = load_learned_loss(tmp_path / "learned_loss.pt")
    tokens = loss.tokens()
    assert [t for t in tokens if isinstance(t, str)] == ["mul", "mul", "y", "log", "add", "f"]
    consts = np.array([t for t in tokens if isinstance(t, float)])
    assert not np.allclose(consts, [-1.0, 0.5])  # refined


def test_a_tree_deeper_than_the_limit_is_refused_not_a_recursion_error():
    deep = "abs(" * 1000 + "sub(f, y)" + ")" * 1000
    with pytest.raises(sym.ExpressionError, match="nested deeper than 64"):
        sym.parse(deep)
    chain = torch.tensor([float(sym.CODES.index("abs"))] * 200 + [1.0])  # abs(abs(...(f)))
    with pytest.raises(sym.ExpressionError, match="nested deeper than 64"):
        sym.structure(chain)


@pytest.mark.parametrize(
    "app, extra, match",
    [
        ("train", ["loss.expression='mul(y, f)'"], "is no loss for classification: not lower"),
        ("meta", ["loss.expression='mul(y, 2.0)'"], "does not depend on the prediction"),
        ("meta", ["meta_optim=cmaes"], "loss.max_constants = 8: with meta_optim=cmaes"),
    ],
)
def test_an_expression_that_is_no_loss_for_the_task_is_refused_before_training(
    compose_cfg, tmp_path, app, extra, match
):
    from metaloss.validate import check_against_task

    cfg = compose_cfg(app, ["loss=symbolic", "task=digits", *extra])
    check_config(cfg)
    from hydra.utils import instantiate

    with pytest.raises(ConfigError, match=match):
        check_against_task(cfg, instantiate(cfg.task))


def test_a_tree_written_in_place_or_passed_functionally_is_the_one_computed():
    """forward remembers the last program it checked: an in-place write (a search setting φ)
    and a program passed through functional_call (held-out selection) must still be used."""
    from torch.func import functional_call

    from metaloss.losses.base import one_hot

    loss = sym.SymbolicLoss(sym.CROSS_ENTROPY)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    ce = loss(x, y)
    loss.set_tokens(sym.parse("square(sub(f, y))"))
    brier = ((torch.softmax(x, -1) - one_hot(y, 3, x.dtype)) ** 2).sum(-1)
    assert torch.allclose(loss(x, y), brier)
    other = sym.SymbolicLoss(sym.CROSS_ENTROPY)
    phi = {"program": other.program, "constants": other.constants.detach()}
    assert torch.allclose(functional_call(loss, phi, (x, y)), ce)
    assert torch.allclose(loss(x, y), brier)

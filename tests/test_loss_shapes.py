"""Every fixed loss refuses the shape mistakes that broadcasting would turn into a wrong
number, names itself and both shapes, accepts the contract's shapes (metaloss.losses.base),
and does the same inside torch.func.vmap (where shapes are per task)."""

import inspect

import pytest
import torch
from torch.func import grad, vmap

from metaloss.losses import fixed as L

B, C, T = 4, 3, 2
LOSSES = {name: fn for name, fn in inspect.getmembers(L, inspect.isfunction)
          if not name.startswith("_") and hasattr(fn, "kinds")}
REGRESSION = sorted(n for n, f in LOSSES.items() if "regression" in f.kinds)
CLASSIFICATION = sorted(n for n, f in LOSSES.items() if "classification" in f.kinds)
BINARY = sorted(n for n, f in LOSSES.items() if "binary" in f.kinds)
SEGMENTATION = sorted(n for n, f in LOSSES.items() if "segmentation" in f.kinds)
COUNTS = {"weighted_ce", "class_balanced_focal", "logit_adjusted_ce", "balanced_softmax"}  # need class_counts in the context


def test_every_loss_is_covered():
    assert set(REGRESSION) | set(BINARY) | set(SEGMENTATION) == set(LOSSES)
    assert {"mse", "ce", "bce", "dice"} <= set(LOSSES) and len(LOSSES) == 26


def call(name, pred, target):
    kw = {}
    if name in COUNTS:
        classes = 2 if pred.ndim == 1 or pred.shape[-1] == 1 else pred.shape[-1]
        kw["class_counts"] = torch.arange(1.0, classes + 1)
    if name == "poisson":
        target = target.abs()
    return LOSSES[name](pred, target, **kw)


def refused(name, pred, target):
    with pytest.raises(ValueError, match=rf"^{name}: .*{list(pred.shape)}.*{list(target.shape)}"):
        call(name, pred, target)


def test_the_issue_example():
    with pytest.raises(ValueError, match=r"mse: .*same shape.*pred \[4, 1\] and target \[4\].*view_as"):
        L.mse(torch.zeros(4, 1), torch.arange(4.0))


def labels(*shape, classes=C):
    return torch.randint(0, classes, shape)


# ------------------------------------------------------------------ contract shapes accepted

def good_cases(name):
    """(pred, target) pairs the contract allows for this loss."""
    if name in REGRESSION:
        return [(torch.randn(B, 2), torch.randn(B, 2)), (torch.randn(B, 1), torch.randn(B, 1)),
                (torch.randn(B), torch.randn(B))]
    if name in SEGMENTATION:
        return [(torch.randn(B, 1, 5, 5), torch.randint(0, 2, (B, 1, 5, 5)).float())]
    binary = [(torch.randn(B), labels(B, classes=2)), (torch.randn(B, 1), labels(B, classes=2)),
              (torch.randn(B, 1), labels(B, classes=2).float())]
    if name == "bce":
        return binary + [(torch.randn(B, 1), labels(B, 1, classes=2).float())]
    return binary + [(torch.randn(B, C), labels(B))]


ALL = sorted(LOSSES)


@pytest.mark.parametrize("name", ALL)
def test_contract_shapes_are_accepted(name):
    for pred, target in good_cases(name):
        out = call(name, pred, target)
        assert out.shape == (B,) and torch.isfinite(out).all(), (name, pred.shape, target.shape)


# ------------------------------------------------------------------ broadcasting mistakes refused

@pytest.mark.parametrize("name", REGRESSION)
def test_regression_refuses_broadcasting(name):
    refused(name, torch.zeros(B, 1), torch.arange(float(B)))         # [B, 1] vs [B] -> [B, B]
    refused(name, torch.zeros(B), torch.zeros(B, 1))                 # [B] vs [B, 1]
    refused(name, torch.zeros(B, 2), torch.zeros(B, 1))              # D mismatch
    refused(name, torch.zeros(B, 1), torch.zeros(1, 1))              # one target for all
    refused(name, torch.zeros(B, 1), torch.zeros(B + 1, 1))          # batch mismatch
    refused(name, torch.zeros(()), torch.zeros(()))                  # no batch dimension


@pytest.mark.parametrize("name", sorted(set(BINARY) - {"bce"}))
def test_classification_refuses_wrong_shapes(name):
    refused(name, torch.zeros(B, C), labels(B, 1))                   # [B, 1] labels -> [B, B, C]
    refused(name, torch.zeros(B, C), torch.eye(C)[labels(B)])        # one-hot targets
    refused(name, torch.zeros(B, C), labels(B + 1))                  # batch mismatch
    refused(name, torch.zeros(B, C, 2), labels(B))                   # 3-D logits
    refused(name, torch.zeros(B, 1), labels(B, 1, classes=2))        # binary needs [B] labels
    with pytest.raises(ValueError, match=rf"^{name}: .*integer class indices"):
        call(name, torch.zeros(B, C), labels(B).float())


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_class_counts_must_match_the_classes(name):
    with pytest.raises(ValueError, match=rf"^{name}: class_counts .*one count per class \({C}"):
        LOSSES[name](torch.zeros(B, C), labels(B), class_counts=[5.0, 5.0])
    with pytest.raises(ValueError, match=rf"^{name}: class_counts .*\(2 for logits \[{B}\]"):
        LOSSES[name](torch.zeros(B), labels(B, classes=2), class_counts=[5.0, 5.0, 5.0])


def test_bce_refuses_wrong_shapes():
    refused("bce", torch.zeros(B, C), labels(B, classes=2))          # not one logit
    refused("bce", torch.zeros(B), labels(B, 1, classes=2))          # [B] vs [B, 1]
    refused("bce", torch.zeros(B, 1), labels(B + 1, classes=2))      # batch mismatch
    refused("bce", torch.zeros(()), labels(classes=2))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_refuses_wrong_shapes(name):
    refused(name, torch.zeros(B, 1, 5, 5), torch.zeros(B, 5, 5))     # mask without channel
    refused(name, torch.zeros(B, 1, 5, 5), torch.zeros(1, 1, 5, 5))  # one mask for all
    refused(name, torch.zeros(B, 1, 5, 5), torch.zeros(B, 1, 5, 4))
    refused(name, torch.zeros(B), torch.zeros(B))                    # no pixels


# ------------------------------------------------------------------ the same under vmap

@pytest.mark.parametrize("name", ALL)
def test_under_vmap_per_task_shapes_are_checked(name):
    for pred, target in good_cases(name):
        preds = torch.stack([pred, pred.flip(0)])                    # T=2 tasks
        targets = torch.stack([target, target.flip(0)])
        batched = vmap(lambda p, t: call(name, p, t))(preds, targets)
        looped = torch.stack([call(name, p, t) for p, t in zip(preds, targets)])
        torch.testing.assert_close(batched, looped)
        # the same target for every task (in_dims=None) is fine too
        vmap(lambda p, t=target: call(name, p, t))(preds)
    pred, wrong = bad_case(name)
    preds, wrongs = torch.stack([pred] * T), torch.stack([wrong] * T)
    with pytest.raises(ValueError, match=rf"^{name}: .*{list(pred.shape)}.*{list(wrong.shape)}"):
        vmap(lambda p, t: call(name, p, t))(preds, wrongs)


def bad_case(name):
    """A per-task (pred, target) pair that would broadcast silently without the check."""
    if name in REGRESSION:
        return torch.randn(B, 1), torch.randn(B)
    if name in SEGMENTATION:
        return torch.randn(B, 1, 5, 5), torch.zeros(B, 5, 5)
    if name == "bce":
        return torch.randn(B), labels(B, 1, classes=2).float()
    return torch.randn(B, C), labels(B, 1)


def test_gradients_flow_through_the_checks_under_vmap():
    x, y = torch.randn(T, B, 1), torch.randn(T, B, 1)
    g = vmap(grad(lambda w, x, y: L.mse(x * w, y).mean()), in_dims=(None, 0, 0))(torch.tensor(0.5), x, y)
    expected = torch.stack([(2 * (x[t] * 0.5 - y[t]) * x[t]).mean() for t in range(T)])
    torch.testing.assert_close(g, expected)

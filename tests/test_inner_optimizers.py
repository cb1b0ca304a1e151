"""Each functional inner optimizer equals torch.optim over several steps, and
meta-gradients through it stay finite when some gradients are exactly zero."""

import pytest
import torch
from hydra.utils import instantiate

from metaloss.config import group_options
from metaloss.inner import optimizers as O

CASES = {
    "sgd": dict(lr=0.1, weight_decay=0.01),
    "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1),
    "nesterov": dict(lr=0.05, momentum=0.8),
    "adagrad": dict(lr=0.1, lr_decay=0.01),
    "rmsprop": dict(lr=0.01, alpha=0.9),
    "adadelta": dict(lr=1.0, rho=0.9),
    "adam": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
    "nadam": dict(lr=0.01),
}


def _loss(params, step):
    w, b = params["w"], params["b"]
    target = torch.sin(torch.arange(6.0, dtype=w.dtype) + step)  # gradients change every step
    return ((w * target - b) ** 2).sum() + 0.1 * (w**4).sum()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_optim_over_steps(name):
    torch.manual_seed(0)
    init = {"w": torch.randn(6, dtype=torch.float64), "b": torch.randn(6, dtype=torch.float64)}
    opt = getattr(O, name)(**CASES[name])
    ref_params = [init["w"].clone().requires_grad_(), init["b"].clone().requires_grad_()]
    ref = opt.torch_equivalent(ref_params)
    params, state = dict(init), opt.init(init)
    for step in range(6):
        ref.zero_grad()
        _loss({"w": ref_params[0], "b": ref_params[1]}, step).backward()
        ref.step()
        grads = torch.func.grad(_loss)(params, step)
        params, state = opt.update(grads, state, params)
        torch.testing.assert_close(params["w"], ref_params[0].detach(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(params["b"], ref_params[1].detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_meta_gradient_finite_with_zero_gradients(name):
    """`still` sits at its optimum: its gradient 2φ(still - 1) is exactly zero at every step
    yet depends on φ, so reverse mode goes through sqrt(v) at v = 0 and must not NaN."""
    phi = torch.tensor(0.7, requires_grad=True)
    opt = getattr(O, name)(**{k: v for k, v in CASES[name].items() if k != "weight_decay"})
    params = {"w": torch.ones(3), "still": torch.ones(3)}
    state = opt.init(params)
    for _ in range(3):
        grads = torch.func.grad(
            lambda p: phi * ((p["w"] ** 2).sum() + ((p["still"] - 1) ** 2).sum())
        )(params)
        params, state = opt.update(grads, state, params)
    assert torch.equal(params["still"], torch.ones(3))
    meta = (params["w"] ** 2).sum() + params["still"].sum()
    (g,) = torch.autograd.grad(meta, phi)
    assert torch.isfinite(g) and g != 0


def test_lr_can_be_a_learned_tensor():
    log_lr = torch.tensor(-2.0, requires_grad=True)
    opt = O.sgd(lr=0.1)
    params = {"w": torch.ones(2)}
    new, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params, lr=log_lr.exp())
    (g,) = torch.autograd.grad(new["w"].sum(), log_lr)
    torch.testing.assert_close(g, -2 * log_lr.exp().detach())


def test_every_optim_config_builds(compose_cfg):
    names = group_options("optim")
    assert set(names) == set(CASES)
    for name in names:
        opt = instantiate(compose_cfg("meta", [f"optim={name}"]).optim)
        assert isinstance(opt, O.InnerOptimizer) and opt.name == name

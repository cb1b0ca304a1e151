"""ML3's learned loss: a small MLP over (prediction, target) with a softplus output.

Bechtle, Molchanov, Chebotar, Grefenstette, Righetti, Sukhatme, Meier,
"Meta Learning via Learned Loss", ICPR 2021 (arXiv:1906.05374).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaloss.losses.base import ParametricLoss, binary_as_two_class, one_hot


class ML3Loss(ParametricLoss):
    """ℓ_φ(ŷ, y) = softplus(MLP_φ([ŷ, y, context])), per output dimension or per class.

    Regression: each output dimension d feeds (ŷ_d, y_d); the loss is the mean over d.
    Classification: each class c feeds (softmax p_c, one-hot y_c) through the same MLP
    and the loss is the sum over classes — vectorised over classes, independent of C,
    and able to express cross-entropy (-Σ_c y_c log p_c is such a sum).
    ``fit_to`` (``ce`` or ``mse``) starts φ from a regression of the network onto that
    loss instead of a random loss (ML3 itself starts at random).
    Optional context: the inputs ``x`` (``use_x``; ``x_dim`` features, flattened) and the training
    progress ``t`` in [0, 1] (``use_progress``).
    """

    kinds = ("regression", "classification", "binary")

    def __init__(
        self,
        hidden=(50, 50),
        use_x: bool = False,
        x_dim: int | None = None,
        use_progress: bool = False,
        init_scale: float = 1.0,
        bias: bool = True,
        init: str = "default",
        fit_to: str | None = None,
        fit_steps: int = 3000,
    ) -> None:
        super().__init__(
            hidden=list(hidden),
            use_x=use_x,
            x_dim=x_dim,
            use_progress=use_progress,
            init_scale=init_scale,
            bias=bias,
            init=init,
            fit_to=fit_to,
            fit_steps=fit_steps,
        )
        if use_x and not x_dim:
            raise ValueError(
                "ML3Loss(use_x=True) needs x_dim, the number of input features "
                "(metaloss fills it in from the task)"
            )
        x_dim = x_dim if use_x else None
        if init not in ("default", "xavier"):
            raise ValueError(f"ML3Loss init must be 'default' or 'xavier', got {init!r}")
        self.x_dim, self.use_progress = x_dim, use_progress
        width = 2 + (x_dim or 0) + int(use_progress)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
            width = h
        last = nn.Linear(width, 1, bias=bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Linear) and init == "xavier":  # as ML3's released code
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        m.bias.zero_()
            last.weight.mul_(init_scale)  # self.net[-1]
        if fit_to is not None:
            self._fit(fit_to, fit_steps)

    @classmethod
    def from_saved(cls, init_kwargs: dict, state_dict: dict) -> ML3Loss:
        return super().from_saved({**init_kwargs, "fit_to": None}, state_dict)  # no re-fit

    def _fit(self, target: str, steps: int) -> None:
        """Start from a known loss: regress the network onto it (context inputs at 0).

        ``ce``: per class -y log p for p in [0.005, 1] (log-uniform), y in {0, 1};
        ``mse``: (ŷ - y)² for ŷ, y in [-5, 5]. The fit data are seeded, the network's starting
        weights are not. Approximate, not exact: measured over 4 starting weights, mean error
        0.7-1.5% of CE on N(0, 1) logits (10 classes) and 3-4% of MSE on N(0, 1) residuals.
        """
        g = torch.Generator().manual_seed(0)
        n = 2048
        if target == "ce":
            a = torch.exp(
                torch.rand(n, generator=g) * torch.log(torch.tensor(0.005))
            )  # log-uniform
            b = (torch.rand(n, generator=g) < 0.5).float()
            ref = -b * torch.log(a)
        elif target == "mse":
            a, b = 10 * torch.rand(n, generator=g) - 5, 10 * torch.rand(n, generator=g) - 5
            ref = (a - b) ** 2
        else:
            raise ValueError(f"ML3Loss fit_to must be 'ce', 'mse' or None, got {target!r}")
        feats = self._features(
            torch.stack([a, b], -1)[:, None, :], torch.zeros(n, self.x_dim or 0), 0.0
        )[:, 0]
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3)
        for _ in range(steps):
            err = F.softplus(self.net(feats)).squeeze(-1) - ref
            loss = (err**2 / (1.0 + ref).sqrt()).mean()  # weighted so small losses are fitted too
            opt.zero_grad()
            loss.backward()
            opt.step()
        for p in self.net.parameters():
            p.grad = None

    def _features(self, pairs: torch.Tensor, x, t) -> torch.Tensor:
        """pairs: [B, K, 2] -> [B, K, 2 + context]."""
        extra = []
        if self.x_dim:
            if x is None:
                raise ValueError(
                    "this ML3 loss was built with x_dim; pass x=... in the loss context"
                )
            xf = x.reshape(x.shape[0], -1)
            extra.append(xf[:, None, :].expand(-1, pairs.shape[1], -1))
        if self.use_progress:
            tt = torch.as_tensor(0.0 if t is None else t, dtype=pairs.dtype, device=pairs.device)
            extra.append(tt.expand(pairs.shape[0], pairs.shape[1], 1))
        return torch.cat([pairs, *extra], dim=-1) if extra else pairs

    def forward(self, pred, target, *, x=None, t=None, **_):
        if target.is_floating_point():  # regression
            pairs = torch.stack(
                [pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1)], dim=-1
            )
            return F.softplus(self.net(self._features(pairs, x, t))).squeeze(-1).mean(-1)
        logits = binary_as_two_class(pred)
        p = torch.softmax(logits, dim=-1)
        pairs = torch.stack([p, one_hot(target, logits.shape[-1], p.dtype)], dim=-1)
        return F.softplus(self.net(self._features(pairs, x, t))).squeeze(-1).sum(-1)

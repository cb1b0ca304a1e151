"""Small model factories for inner loops: ``factory(in_shape=..., out_dim=..., **hparams)``.

No BatchNorm running statistics anywhere (they break under ``vmap`` and ``higher`` drops
them); GroupNorm is used where normalisation helps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def mlp(
    *,
    in_shape: Sequence[int],
    out_dim: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
) -> nn.Module:
    """Flatten, then Linear/activation layers; ``hidden=[]`` is a linear (logistic) model."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class _Unsqueeze(nn.Module):
    def forward(self, x):
        return x[:, None, :] if x.ndim == 2 else x


def cnn1d(
    *, in_shape: Sequence[int], out_dim: int, channels: int = 32, kernel: int = 5, depth: int = 3
) -> nn.Module:
    """1-D convnet for sequences like MNIST-1D (Greydanus 2020 uses 3 strided conv layers)."""
    if len(in_shape) not in (1, 2):
        raise ValueError(f"cnn1d expects [L] or [C, L] inputs, got {list(in_shape)}")
    c_in = 1 if len(in_shape) == 1 else in_shape[0]
    length = in_shape[-1]
    if kernel > length:
        raise ValueError(f"cnn1d kernel ({kernel}) is longer than the input sequence ({length})")
    layers: list[nn.Module] = [_Unsqueeze()]
    for i in range(depth):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv1d(c_in, channels, kernel, stride=stride, padding=kernel // 2), nn.ReLU()]
        c_in = channels
        length = (length + 2 * (kernel // 2) - kernel) // stride + 1
    layers += [nn.Flatten(), nn.Linear(channels * length, out_dim)]
    return nn.Sequential(*layers)


def convnet(
    *, in_shape: Sequence[int], out_dim: int, channels: int = 16, depth: int = 2, groups: int = 4
) -> nn.Module:
    """Small 2-D convnet with GroupNorm for image classification (e.g. 8x8 digits)."""
    if len(in_shape) != 3:
        raise ValueError(f"convnet expects [C, H, W] inputs, got {list(in_shape)}")
    c_in = in_shape[0]
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [
            nn.Conv2d(c_in, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        ]
        c_in = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_dim)]
    return nn.Sequential(*layers)


def _block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Two-level U-Net (Ronneberger et al. 2015), GroupNorm, per-pixel logits [B, out, H, W]."""

    def __init__(self, c_in: int, out_dim: int, base: int = 8, groups: int = 4) -> None:
        super().__init__()
        self.enc1 = _block(c_in, base, groups)
        self.enc2 = _block(base, 2 * base, groups)
        self.mid = _block(2 * base, 4 * base, groups)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = _block(4 * base, 2 * base, groups)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.dec1 = _block(2 * base, base, groups)
        self.head = nn.Conv2d(base, out_dim, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def unet(*, in_shape: Sequence[int], out_dim: int, base: int = 8, groups: int = 4) -> nn.Module:
    """Small U-Net for segmentation; H and W must be divisible by 4."""
    if len(in_shape) != 3 or in_shape[1] % 4 or in_shape[2] % 4:
        raise ValueError(
            f"unet expects [C, H, W] inputs with H, W divisible by 4, got {list(in_shape)}"
        )
    return UNet(in_shape[0], out_dim, base, groups)

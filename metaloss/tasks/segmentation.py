"""Synthetic binary segmentation: small random shapes on noisy backgrounds."""

from __future__ import annotations

import torch

from metaloss.tasks.base import Task


def _draw(n: int, size: int, max_shapes: int, radius, noise: float, g: torch.Generator):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    yy, xx = yy.float(), xx.float()
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, max_shapes + 1, (), generator=g))):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = radius[0] + (radius[1] - radius[0]) * float(torch.rand((), generator=g))
            if torch.rand((), generator=g) < 0.5:  # disc
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:  # axis-aligned square
                shape = ((yy - cy).abs() <= r * 0.8) & ((xx - cx).abs() <= r * 0.8)
            masks[i, 0] = torch.maximum(masks[i, 0], shape.float())
    # Foreground is brighter on average but overlaps the background through the noise,
    # and a smooth illumination gradient makes a global threshold insufficient.
    ramp = torch.linspace(-0.5, 0.5, size)[None, None, None, :] * torch.rand(
        n, 1, 1, 1, generator=g
    )
    images = masks * 1.0 + ramp + noise * torch.randn(n, 1, size, size, generator=g)
    return images, masks


def shapes(
    *,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 100,
    n_test: int = 200,
    size: int = 32,
    max_shapes: int = 2,
    radius=(1.5, 3.5),
    noise: float = 0.6,
) -> Task:
    """Binary segmentation of 1-2 small discs/squares per 32x32 image (about 5% foreground,
    so pixel accuracy is uninformative and Dice/IoU matter)."""
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = _draw(n_train, size, max_shapes, radius, noise, g)
    xva, yva = _draw(n_val, size, max_shapes, radius, noise, g)
    xte, yte = _draw(n_test, size, max_shapes, radius, noise, g)
    return Task(
        "shapes",
        "segmentation",
        xtr,
        ytr,
        xva,
        yva,
        xte,
        yte,
        info={"foreground_fraction": float(ytr.mean())},
    )

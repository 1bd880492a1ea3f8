"""Synthetic observations through a known operator, for benchmarks: ``y = A(x) + sigma n``.

The operator is any :class:`~bir.operators.base.Operator`, in practice one built from a
``conf/operator`` config (the tasks of ``conf/benchmark/*.yaml`` and ``bir-bench quality`` name
one, with field overrides). :func:`observe` draws the operator's random truth (motion kernels,
random masks) and then the noise from each image's generator, and returns the truth (the
operator, its kernel or mask), so a method's estimate can be scored against it.
:func:`motion_kernel` draws the camera-shake kernels of :class:`~bir.operators.blur.MotionBlur`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bir.operators.base import Operator


def motion_kernel(
    size: int, intensity: float, generator: torch.Generator, steps: int = 64
) -> torch.Tensor:
    """A motion-blur kernel ``[size, size]`` (sums to 1) from a random 2-D trajectory.

    The camera moves ``steps`` unit steps; the heading changes by a Gaussian angle whose spread
    grows with ``intensity`` in [0, 1] (0: a straight line). The path is centred, scaled to span
    the kernel, and splatted bilinearly onto the grid.
    """
    g = generator
    heading = 2 * math.pi * torch.rand((), generator=g, device=g.device).item()
    turns = torch.randn(steps, generator=g, device=g.device).cpu() * (0.05 + intensity)
    angles = heading + torch.cumsum(turns, 0).double()
    path = torch.cumsum(torch.stack([angles.cos(), angles.sin()], -1), 0)
    path = path - (path.amax(0) + path.amin(0)) / 2  # centre the bounding box
    extent = path.abs().max().clamp(min=1e-8)
    path = path / extent * (size - 1) / 2 * 0.9 + (size - 1) / 2
    kernel = torch.zeros(size, size, dtype=torch.float64)
    for x, y in path.tolist():
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        for dx, dy, wt in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size:
                kernel[y0 + dy, x0 + dx] += wt
    return (kernel / kernel.sum()).float()


@torch.no_grad()
def observe(
    x: torch.Tensor, operator: Operator, sigma: float, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, dict]:
    """Observe ``x`` through ``operator`` plus white Gaussian noise.

    Args:
        x: clean images ``[B, 3, H, W]`` in [0, 1].
        operator: the known operator, not yet initialised: its ``init_batch`` runs here, so its
            random parts (a motion kernel, a random mask) come from the images' generators.
        sigma: noise standard deviation on the [0, 1] scale (e.g. 0.05).
        generators: one per image; each image's truth is drawn first, then its noise, from its
            own generator, so results do not depend on the batch the image was in.
    Returns:
        ``y`` ([B, 3, h, w] clamped to [0, 1]; 0 where the operator's loss mask is 0: missing
        pixels carry no noise) and the truth: ``operator`` (initialised), ``sigma``, and what
        the operator estimates (``kernel`` [B, 1, k, k], ``mask`` [B or 1, 1, H, W], ``factor``).
    """
    gens = list(generators)
    operator.init_batch(tuple(x.shape), gens)
    op = operator.to(x.device)
    clean = op(x)
    noise = torch.stack([torch.randn(clean.shape[1:], generator=g, device=g.device) for g in gens])
    y = (clean + sigma * noise.to(clean)).clamp(0, 1)
    mask = op.loss_mask()
    if mask is not None:
        y = y * mask.to(y)  # missing pixels carry no noise
    return y, {"operator": op, "sigma": float(sigma), **op.estimate()}

"""Synthetic observations from a *known* operator, for benchmarks: ``y = A(x) + sigma n``.

:func:`degrade` returns the observation and the true parameters (kernel, mask, the operator
itself), so a method's estimate can be scored against the truth.

``op_spec`` kinds (extra keys in brackets, defaults after ``=``):

- ``gaussian_blur`` [kernel_size=41, blur_sigma=3.0, padding="reflect"]
- ``motion_blur`` [kernel_size=41, intensity=0.5, steps=64, padding="reflect"]: a kernel from a
  random camera trajectory (a random walk whose heading drifts, as in Boracchi & Foi 2012),
  drawn per image.
- ``avgpool`` / ``bicubic`` [scale=8 / 4]: downsampling.
- ``inpaint`` [mask_kind="box", box_size=None, keep_ratio=0.25]: masking.
- ``identity``: noise only (denoising).
- ``grayscale``: BT.601 luma (colourisation).
"""

from __future__ import annotations

import math

import torch

from bir.operators.base import Operator
from bir.operators.blur import FixedKernelBlur, gaussian_kernel
from bir.operators.mask import InpaintMask
from bir.operators.pointwise import Grayscale, Identity
from bir.operators.resample import AvgPoolDownsample, BicubicDownsample


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


def _generators(
    generator: torch.Generator | list[torch.Generator], n: int
) -> list[torch.Generator]:
    if isinstance(generator, torch.Generator):
        return [generator] * n
    if len(generator) != n:
        raise ValueError(f"{len(generator)} generators for a batch of {n}")
    return list(generator)


def make_operator(
    op_spec: dict, generators: list[torch.Generator], shape: tuple[int, ...] | None = None
) -> Operator:
    """The known operator described by ``op_spec`` (see the module docstring), with its random
    parameters (motion kernels, random masks) drawn from ``generators`` (one per image); with
    ``shape`` (the clean batch's ``[B, C, H, W]``) it is also initialised for that batch."""
    kind = op_spec["kind"]
    size = int(op_spec.get("kernel_size", 41))
    padding = op_spec.get("padding", "reflect")
    if kind == "gaussian_blur":
        op = FixedKernelBlur(
            gaussian_kernel(size, float(op_spec.get("blur_sigma", 3.0))), padding=padding
        )
    elif kind == "motion_blur":
        intensity, steps = float(op_spec.get("intensity", 0.5)), int(op_spec.get("steps", 64))
        kernels = torch.stack([motion_kernel(size, intensity, g, steps) for g in generators])
        op = FixedKernelBlur(kernels[:, None], padding=padding)
    elif kind == "avgpool":
        op = AvgPoolDownsample(int(op_spec.get("scale", 8)))
    elif kind == "bicubic":
        op = BicubicDownsample(int(op_spec.get("scale", 4)))
    elif kind == "inpaint":
        op = InpaintMask(
            kind=op_spec.get("mask_kind", "box"),
            box_size=op_spec.get("box_size"),
            keep_ratio=float(op_spec.get("keep_ratio", 0.25)),
        )
    elif kind == "identity":
        op = Identity()
    elif kind == "grayscale":
        op = Grayscale()
    else:
        raise ValueError(f"unknown synthetic operator kind {kind!r}")
    if shape is not None:
        op.init_batch(shape, generators)
    return op


@torch.no_grad()
def degrade(
    x: torch.Tensor,
    op_spec: dict,
    sigma: float,
    generator: torch.Generator | list[torch.Generator],
) -> tuple[torch.Tensor, dict]:
    """Observe ``x`` through a known operator plus white Gaussian noise.

    Args:
        x: clean images ``[B, 3, H, W]`` in [0, 1].
        op_spec: ``{"kind": ..., **options}`` (module docstring).
        sigma: noise standard deviation on the [0, 1] scale (e.g. 0.05).
        generator: one generator for the whole batch, or one per image (results then do not
            depend on the batch the image was in).
    Returns:
        ``y`` ([B, 3, h, w] clamped to [0, 1]) and the truth: ``operator`` (the known
        :class:`Operator`), ``sigma``, and ``kernel`` ([B, 1, k, k]) or ``mask``
        ([B or 1, 1, H, W]) when the operator has one.
    """
    gens = _generators(generator, x.shape[0])
    op = make_operator(op_spec, gens, tuple(x.shape)).to(x.device)
    clean = op(x)
    noise = torch.stack([torch.randn(clean.shape[1:], generator=g, device=g.device) for g in gens])
    y = (clean + sigma * noise.to(clean)).clamp(0, 1)
    if op_spec["kind"] == "inpaint":
        y = y * op.loss_mask()  # missing pixels carry no noise
    truth = {"operator": op, "sigma": float(sigma), **op.estimate()}
    return y, truth

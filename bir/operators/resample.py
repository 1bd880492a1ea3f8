"""Downsampling operators for super-resolution: ``y = D_s(x)``, ``[B, C, sH, sW] -> [B, C, H, W]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bir.operators.base import Operator


class AvgPoolDownsample(Operator):
    """Mean of every ``scale x scale`` block (BIRD's SR operator, ``AdaptiveAvgPool2d`` on
    sizes divisible by the scale).

    Args:
        scale: integer downsampling factor; input sides must be multiples of it.
    """

    def __init__(self, scale: int = 8):
        super().__init__()
        self.scale = int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, sH, sW]`` in [0, 1] -> ``[B, C, H, W]`` in [0, 1]."""
        h, w = x.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"image size {h}x{w} is not a multiple of the scale {self.scale}")
        return F.avg_pool2d(x, self.scale)

    def input_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """Size of x that maps to an observation of ``out_hw``."""
        return out_hw[0] * self.scale, out_hw[1] * self.scale

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return in_hw[0] // self.scale, in_hw[1] // self.scale


class BicubicDownsample(Operator):
    """Antialiased bicubic downsampling (``F.interpolate(..., antialias=True)``, the same filter
    as PIL / MATLAB ``imresize``). Output may overshoot [0, 1] slightly (bicubic ringing); it is
    not clamped so the operator stays linear.

    Args:
        scale: integer downsampling factor.
        antialias: widen the cubic filter by the scale (True: imresize-style).
    """

    def __init__(self, scale: int = 4, antialias: bool = True):
        super().__init__()
        self.scale, self.antialias = int(scale), antialias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, sH, sW]`` -> ``[B, C, H, W]``."""
        h, w = x.shape[-2:]
        size = (h // self.scale, w // self.scale)
        return F.interpolate(
            x, size=size, mode="bicubic", align_corners=False, antialias=self.antialias
        )

    def input_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        return out_hw[0] * self.scale, out_hw[1] * self.scale

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return in_hw[0] // self.scale, in_hw[1] // self.scale

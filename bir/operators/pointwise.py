"""Per-pixel operators: identity (denoising) and grayscale (colourisation)."""

from __future__ import annotations

import torch

from bir.operators.base import Operator

#: ITU-R BT.601 luma weights for R, G, B
BT601_WEIGHTS = (0.299, 0.587, 0.114)


class Identity(Operator):
    """``y = x`` (denoising: the noise belongs to the observation, see
    :func:`bir.operators.synthetic.observe`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Grayscale(Operator):
    """``y = Y(x)`` repeated to 3 channels, with BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B``.

    Args:
        weights: luma weights for (R, G, B).
    """

    def __init__(self, weights: tuple[float, float, float] = BT601_WEIGHTS):
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, H, W]`` with three equal channels."""
        luma = (x * self.weights.to(x.dtype)).sum(1, keepdim=True)
        return luma.expand(-1, 3, -1, -1)

"""The interface every forward operator implements.

An operator maps a clean batch ``x`` ([B, C, H, W] in [0, 1]) to what the degraded observation
``y`` should look like. Operators whose parameters a method estimates (a blur kernel, a low-light
factor, a mask) hold them with a leading batch dimension, allocated by :meth:`Operator.init_batch`,
so every image gets its own estimate and the estimates do not interact.
"""

from __future__ import annotations

import torch
from torch import nn


class Operator(nn.Module):
    """A differentiable forward model ``y = A(x)``.

    Subclasses implement ``forward(x) -> y`` (nn.Module's own check rejects an operator
    without one) and, when they have per-image parameters,
    :meth:`init_batch`, :meth:`param_groups` and :meth:`estimate`.
    """

    #: whether the operator has parameters that a method optimises
    learnable: bool = False

    def init_batch(self, batch_size: int, generators: list[torch.Generator] | None = None) -> None:
        """(Re)allocate per-image parameters for a batch of ``batch_size`` images."""

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups (``{"params": [...], "lr": ..., "name": ...}``)."""
        return []

    def estimate(self) -> dict[str, torch.Tensor]:
        """Per-image estimates to save, each with a leading batch dimension (e.g. ``kernel``)."""
        return {}

    def loss_mask(self) -> torch.Tensor | None:
        """Per-pixel weights of the data term ([B or 1, 1 or C, H', W']) or None (all ones)."""
        return None

    def input_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """Size of the clean image that maps to an observation of size ``out_hw`` (identity
        unless the operator resamples, e.g. ``scale * out_hw`` for x``scale`` downsampling)."""
        return out_hw


def additive_mask_for(
    current: nn.Parameter | None,
    x: torch.Tensor,
    generators: list[torch.Generator] | None,
    init_scale: float,
) -> nn.Parameter:
    """A learnable per-image additive mask ``[B, 1, H, W]`` for a batch like ``x`` (GDP / BIR-D's
    ``M``): ``current`` when it already fits, else a new one drawn uniformly in [0, init_scale)
    from each image's generator (zeros without generators), so it does not depend on the batch."""
    b, _, h, w = x.shape
    if current is not None and current.shape[0] == b and current.shape[-2:] == (h, w):
        return current
    if generators is not None and len(generators) == b:
        draws = [torch.rand((1, h, w), generator=g, device=g.device) for g in generators]
        start = torch.stack(draws).to(x.device)
    else:
        start = torch.zeros(b, 1, h, w, device=x.device)
    return nn.Parameter(start * init_scale)

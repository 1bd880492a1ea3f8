"""The interface every forward operator implements (docs/contracts.md, "Forward operators").

An operator maps a clean batch ``x`` ([B, C, H, W] in [0, 1]) to what the degraded observation
``y`` should look like. Operators whose parameters a method estimates (a blur kernel, a low-light
factor, an additive mask) hold them with a leading batch dimension, so every image gets its own
estimate and the estimates do not interact.

Life cycle: a method calls ``op.init_batch(x_shape, generators)`` once per batch, *before* it
builds an optimiser; that call creates every parameter the method may learn, at its final size
(a mask has the observation's height and width). ``param_groups`` then lists them and nothing
is allocated later (a parameter created on the first forward call would be missing from an
optimiser built in between).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Shape = Sequence[int]


class Operator(nn.Module):
    """A differentiable forward model ``y = A(x)``.

    Subclasses implement ``forward(x) -> y`` and, when they have per-image parameters,
    :meth:`init_batch`, :meth:`param_groups` and :meth:`estimate`. Size-changing operators
    implement :meth:`input_size` and :meth:`output_size`; operators with per-pixel parameters
    implement :meth:`forward_window` (used by the per-patch guidance of BIR-D / GDP).
    """

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """Create the per-image parameters for a clean batch of shape ``[B, C, H, W]``.

        Args:
            shape: the full shape of the clean image ``x`` the operator will be applied to.
            generators: one ``torch.Generator`` per image for random initial values (the
                parameters are drawn on the generators' device); None draws deterministic
                defaults.
        """

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups (``{"params": [...], "lr": ..., "name": ...}``) of the
        parameters a method should learn (all created by :meth:`init_batch`)."""
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
        return tuple(out_hw)

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Size of the observation of a clean image of size ``in_hw`` (inverse of
        :meth:`input_size`)."""
        return tuple(in_hw)

    def forward_window(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        """``A`` restricted to the window of the clean image whose top-left corner is
        ``(top, left)`` and whose size is ``x``'s: per-pixel parameters are sliced to the window,
        the rest acts as on a whole image (a blur pads at the window's border, as the BIR-D code's
        per-patch loss). Only for operators whose output has the input's size."""
        return self(x)

    def _device(self) -> torch.device:
        """Device of the operator's first parameter or buffer (CPU if it has none)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")


def batch_size_of(shape: Shape, generators: Sequence[torch.Generator] | None) -> int:
    """``shape[0]``, checked against the number of generators; raises ValueError on a mismatch
    or a shape that is not ``[B, C, H, W]``."""
    if not isinstance(shape, Sequence) or len(shape) != 4:
        raise ValueError(f"init_batch needs the clean batch shape [B, C, H, W], got {shape!r}")
    b = int(shape[0])
    if generators is not None and len(generators) != b:
        raise ValueError(f"{len(generators)} generators for a batch of {b}")
    return b


def draw_uniform(
    shape: Shape,
    generators: Sequence[torch.Generator],
    scale: float,
    device: torch.device,
) -> torch.Tensor:
    """``[B, *shape]`` uniform in ``[0, scale)``, row ``b`` from ``generators[b]`` on its device,
    so a draw does not depend on the batch the image is in."""
    draws = [torch.rand(tuple(shape), generator=g, device=g.device) for g in generators]
    return (torch.stack(draws) * scale).to(device)


def additive_mask(
    batch: int,
    hw: tuple[int, int],
    generators: Sequence[torch.Generator] | None,
    init_scale: float,
    device: torch.device,
) -> nn.Parameter:
    """A learnable per-image additive mask ``[B, 1, H, W]`` (GDP / BIR-D's ``M``, one map shared
    by the colour channels as the released ``light_mask``), uniform in ``[0, init_scale)`` from
    each image's generator (the code's ``rand / 10000``), zeros without generators."""
    if generators is None:
        return nn.Parameter(torch.zeros(batch, 1, *hw, device=device))
    return nn.Parameter(draw_uniform((1, *hw), generators, init_scale, device))

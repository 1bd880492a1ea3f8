"""GDP's low-light model ``y = f * x + M``: one scalar brightness factor per image and an
additive mask (Fei et al. 2023, "Generative Diffusion Prior for Unified Image Restoration and
Enhancement": its low-light model ``y = f x + M``).

The released script (``sample_x0_enhancement_low_light.py``) starts ``f`` at ``randn / 100`` and
the mask at ``rand / 10000`` (one [H, W] map shared by the colour channels) and updates both by
plain gradient descent with step 1 on the batch-summed MSE. (BIR-D's ``lowlight.py`` replaces
``f`` by a learnable 3x3 depthwise kernel: :class:`~bir.operators.kernel_mask.KernelMaskOperator`
with ``kernel_size=3, init=rand``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bir.operators.base import Operator, Shape, additive_mask, batch_size_of


class LowLightOperator(Operator):
    """``y = f * x + M`` with a per-image scalar ``f`` ([B, 1, 1, 1]) and mask ``M``
    ([B, 1, H, W]).

    Args:
        factor_init_std: ``f`` starts as ``factor_init_mean + factor_init_std * N(0, 1)``
            (code: mean 0, std 0.01); 0 draws nothing (a known factor, e.g. a benchmark's truth).
        factor_init_mean: see above.
        mask_init_scale: the mask starts uniform in ``[0, mask_init_scale)`` (code 1e-4).
        use_mask: add ``M`` at all.
        learn_factor / learn_mask: whether :meth:`param_groups` offers them to the optimiser.
        lr: gradient-descent step for both (code: 1); ``None`` uses the method's default.
    """

    def __init__(
        self,
        factor_init_std: float = 0.01,
        factor_init_mean: float = 0.0,
        mask_init_scale: float = 1e-4,
        use_mask: bool = True,
        learn_factor: bool = True,
        learn_mask: bool = True,
        lr: float | None = 1.0,
    ):
        super().__init__()
        self.factor_init_std, self.factor_init_mean = factor_init_std, factor_init_mean
        self.mask_init_scale, self.use_mask = mask_init_scale, use_mask
        self.learn_factor, self.learn_mask, self.lr = learn_factor, learn_mask, lr
        self.factor = nn.Parameter(torch.full((1, 1, 1, 1), factor_init_mean))
        self.mask: nn.Parameter | None = None

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """Draw each image's ``f`` (then its mask) from its own generator."""
        b = batch_size_of(shape, generators)
        device = generators[0].device if generators else self._device()
        if generators is None or self.factor_init_std == 0:  # f is known: nothing to draw
            noise = torch.zeros(b, device=device)
        else:
            noise = torch.stack([torch.randn((), generator=g, device=g.device) for g in generators])
        dtype = self.factor.dtype  # the module's dtype (after .double(), for instance)
        f = self.factor_init_mean + self.factor_init_std * noise.to(device)
        self.factor = nn.Parameter(f.reshape(b, 1, 1, 1).to(dtype))
        self.mask = None
        if self.use_mask:
            mask = additive_mask(b, tuple(shape[-2:]), generators, self.mask_init_scale, device)
            self.mask = nn.Parameter(mask.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> ``f x (+ M)`` (not clamped)."""
        return self.forward_window(x, 0, 0)

    def forward_window(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        y = self.factor.to(x.dtype) * x
        if self.use_mask:
            if self.mask is None:
                raise RuntimeError("LowLightOperator: call init_batch(x.shape, generators) first")
            h, w = x.shape[-2:]
            y = y + self.mask[..., top : top + h, left : left + w].to(x.dtype)
        return y

    def param_groups(self, lr: float) -> list[dict]:
        step = self.lr or lr
        groups = []
        if self.learn_factor:
            groups.append({"params": [self.factor], "lr": step, "name": "factor"})
        if self.learn_mask and self.use_mask and self.mask is not None:
            groups.append({"params": [self.mask], "lr": step, "name": "mask"})
        return groups

    def estimate(self) -> dict[str, torch.Tensor]:
        """``factor``: ``[B]``; ``mask_mean``: ``[B]`` (when the mask is used)."""
        out = {"factor": self.factor.detach().flatten().clone()}
        if self.use_mask and self.mask is not None:
            out["mask_mean"] = self.mask.detach().mean(dim=(1, 2, 3))
        return out

"""GDP / BIR-D low-light model ``y = f * x + M``: one scalar brightness factor per image and an
additive mask (Fei et al. 2023, "Generative Diffusion Prior for Unified Image Restoration and
Enhancement": its low-light model ``y = f x + M``).

The reference (``sample_x0_enhancement_low_light.py``) starts ``f`` at ``randn / 100`` and the
mask at ``rand / 10000`` (one [H, W] map shared by the colour channels) and updates both by
plain gradient descent with step 1 on the batch-summed MSE.
"""

from __future__ import annotations

import torch
from torch import nn

from bir.operators.base import Operator, additive_mask_for


class LowLightOperator(Operator):
    """``y = f * x + M`` with a per-image scalar ``f`` and mask ``M`` ([B, 1, H, W]).

    Args:
        factor_init_std: ``f`` starts as ``factor_init_mean + factor_init_std * N(0, 1)``
            (reference: mean 0, std 0.01).
        factor_init_mean: see above.
        mask_init_scale: the mask starts uniform in ``[0, mask_init_scale)`` (reference 1e-4).
        use_mask: add ``M`` at all.
        learn_factor / learn_mask: whether :meth:`param_groups` offers them to the optimiser.
        lr: gradient-descent step for both (reference: 1); ``None`` uses the method's default.
    """

    learnable = True

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
        self.learnable = learn_factor or (learn_mask and use_mask)
        self.factor = nn.Parameter(torch.full((1, 1, 1, 1), factor_init_mean))
        self.mask: nn.Parameter | None = None
        self._generators: list[torch.Generator] | None = None

    def init_batch(self, batch_size: int, generators: list[torch.Generator] | None = None) -> None:
        """Draw ``f`` per image from ``generators[b]``; the mask is drawn on first use."""
        if generators is None:
            noise = torch.zeros(batch_size)
        else:
            noise = torch.stack(
                [torch.randn((), generator=g, device=g.device).cpu() for g in generators]
            )
        f = self.factor_init_mean + self.factor_init_std * noise
        self.factor = nn.Parameter(f.reshape(batch_size, 1, 1, 1).to(self.factor.device))
        self.mask = None
        self._generators = generators

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask ``[B, 1, H, W]`` for a batch like ``x``, allocated on first use."""
        self.mask = additive_mask_for(self.mask, x, self._generators, self.mask_init_scale)
        return self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> ``f x (+ M)`` (not clamped)."""
        y = self.factor.to(x.dtype) * x
        if self.use_mask:
            y = y + self.mask_for(x).to(x.dtype)
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

"""BIR-D's universal degradation model ``y = K * x + M``: a learnable depthwise kernel plus an
additive mask (Tu et al. 2024, "Taming Generative Diffusion Prior for Universal Blind Image
Restoration", the optimisable convolution kernel).

The kernel is a free ``k x k`` filter per colour channel (the reference code uses 9x9, the paper
text says 7x7) and is *not* constrained to be non-negative or to sum to 1, so it can also model a
brightness change; the mask ``M`` is one map per image, shared by the colour channels as in the
reference (``light_mask`` of shape [H, W]). Both are updated by plain gradient descent inside the
sampler (reference: ``weight - lr * grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bir.operators.base import Operator, additive_mask_for

#: torch ``F.pad`` modes by the names used in configs
PADDING_MODES = {"reflect": "reflect", "circular": "circular", "zeros": "constant"}


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian ``[size, size]`` (odd size) centred on the middle tap, sums to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()


def depthwise_convolve(
    x: torch.Tensor, kernel: torch.Tensor, padding: str = "reflect"
) -> torch.Tensor:
    """Convolve image ``b``, channel ``c`` with ``kernel[b, c]``; output the size of the input.

    Args:
        x: ``[B, C, H, W]``.
        kernel: ``[B, C, k, k]`` (odd k); a true convolution (kernel flipped), like
            ``bir.operators.blur``. The BIR-D code cross-correlates; for a learned kernel that
            only mirrors the estimate.
        padding: ``reflect`` | ``circular`` | ``zeros``.
    Returns:
        ``[B, C, H, W]``, differentiable w.r.t. both inputs.
    """
    b, c, h, w = x.shape
    k = kernel.shape[-1]
    p = k // 2
    x = F.pad(x, (p, p, p, p), mode=PADDING_MODES[padding])
    weight = kernel.to(x.dtype).expand(b, c, k, k).flip(-1, -2).reshape(b * c, 1, k, k)
    out = F.conv2d(x.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.reshape(b, c, h, w)


class KernelMaskOperator(Operator):
    """``y = K * x + M`` with a per-image depthwise kernel ``K`` and additive mask ``M``.

    Args:
        kernel_size: odd kernel size k (BIR-D code: 9).
        channels: image channels C; the kernel is ``[B, C, k, k]`` (depthwise).
        init_sigma: the kernel starts as a Gaussian of this sigma in pixels (the reference's
            hard-coded 9x9 start is a Gaussian of sigma ~2.5); ``None`` starts from a delta.
        mask_init_scale: the mask starts uniform in ``[0, mask_init_scale)`` (reference 1e-4).
        use_mask: add ``M`` at all (the reference deblurring script leaves it out of its loss).
        learn_kernel / learn_mask: whether :meth:`param_groups` offers them to the optimiser.
        kernel_lr / mask_lr: gradient-descent step sizes (reference: 0.01 for the 9x9 kernel);
            ``None`` uses the method's default learning rate.
        padding: ``reflect`` | ``circular`` | ``zeros`` (the reference pads with zeros; reflect
            avoids dark borders).
    """

    learnable = True

    def __init__(
        self,
        kernel_size: int = 9,
        channels: int = 3,
        init_sigma: float | None = 2.5,
        mask_init_scale: float = 1e-4,
        use_mask: bool = True,
        learn_kernel: bool = True,
        learn_mask: bool = True,
        kernel_lr: float | None = 0.01,
        mask_lr: float | None = 0.01,
        padding: str = "reflect",
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {list(PADDING_MODES)}, got {padding!r}")
        self.kernel_size, self.channels, self.init_sigma = kernel_size, channels, init_sigma
        self.mask_init_scale, self.use_mask = mask_init_scale, use_mask
        self.learn_kernel, self.learn_mask = learn_kernel, learn_mask
        self.kernel_lr, self.mask_lr, self.padding = kernel_lr, mask_lr, padding
        self.learnable = learn_kernel or (learn_mask and use_mask)
        self.kernel = nn.Parameter(self.initial_kernel().expand(1, channels, -1, -1).clone())
        self.mask: nn.Parameter | None = None
        self._generators: list[torch.Generator] | None = None

    def initial_kernel(self) -> torch.Tensor:
        """The starting kernel ``[k, k]`` (sums to 1)."""
        k = self.kernel_size
        if self.init_sigma is None:
            start = torch.zeros(k, k)
            start[k // 2, k // 2] = 1.0
            return start
        return gaussian_kernel(k, self.init_sigma)

    def init_batch(self, batch_size: int, generators: list[torch.Generator] | None = None) -> None:
        """One kernel per image; the mask is drawn on first use, at the image's size, from
        ``generators[b]`` (so it does not depend on the batch)."""
        start = self.initial_kernel().to(self.kernel.device)
        self.kernel = nn.Parameter(start.expand(batch_size, self.channels, -1, -1).clone())
        self.mask = None
        self._generators = generators

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask ``[B, 1, H, W]`` for a batch like ``x``, allocated on first use."""
        self.mask = additive_mask_for(self.mask, x, self._generators, self.mask_init_scale)
        return self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> ``K * x (+ M)``, ``[B, C, H, W]`` (not clamped)."""
        y = depthwise_convolve(x, self.kernel, self.padding)
        if self.use_mask:
            y = y + self.mask_for(x).to(x.dtype)
        return y

    def param_groups(self, lr: float) -> list[dict]:
        groups = []
        if self.learn_kernel:
            groups.append({"params": [self.kernel], "lr": self.kernel_lr or lr, "name": "kernel"})
        if self.learn_mask and self.use_mask and self.mask is not None:
            groups.append({"params": [self.mask], "lr": self.mask_lr or lr, "name": "mask"})
        return groups

    def estimate(self) -> dict[str, torch.Tensor]:
        """``kernel``: ``[B, C, k, k]`` normalised to sum 1 per channel (the contract's format);
        ``kernel_gain``: ``[B, C]`` the raw kernel's sums (its brightness gain); ``mask_mean``:
        ``[B]`` (when the mask is used)."""
        k = self.kernel.detach()
        gain = k.sum(dim=(-1, -2))
        out = {"kernel": k / gain[..., None, None], "kernel_gain": gain.clone()}
        if self.use_mask and self.mask is not None:
            out["mask_mean"] = self.mask.detach().mean(dim=(1, 2, 3))
        return out

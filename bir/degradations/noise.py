"""Additive Gaussian and Poisson (shot) noise with per-sample strength and generators.

Each sample's noise is drawn at that sample's own size from its own generator, so it does not
depend on the batch it is in. Outputs are new tensors clamped to [0, 1] (BasicSR ``clip=True``,
``rounds=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ITU-R BT.601 luma weights (torchvision ``rgb_to_grayscale``, used by BasicSR for gray noise).
_LUMA = (0.299, 0.587, 0.114)

# Poisson "photon count" per unit intensity. BasicSR counts the unique 8-bit values of each image
# and uses 2 ** ceil(log2(count)) (slow: a sort per image); that count is 256 for any image with
# more than 128 distinct levels (almost every natural crop), so it is fixed to 256 here.
POISSON_LEVELS = 256.0


def _gray(img: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] BT.601 luma (single-channel inputs pass through)."""
    if img.shape[1] == 1:
        return img
    w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def add_gaussian_noise(
    img: torch.Tensor,
    sigma: torch.Tensor | Sequence[float],
    gray: torch.Tensor | Sequence[bool],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """img + N(0, sigma^2), clamped to [0, 1].

    Args:
        img: [B, C, H, W] in [0, 1].
        sigma: [B] standard deviation in [0, 1] units (Real-ESRGAN draws sigma/255, sigma in [1, 30]).
        gray: [B] bool; True draws one noise channel shared by all channels.
        generators: B generators on ``img.device``.
    Returns:
        [B, C, H, W] in [0, 1].
    """
    b, c, h, w = img.shape
    sigma = torch.as_tensor(sigma, dtype=img.dtype, device=img.device).view(b, 1, 1, 1)
    noise = []
    for i, g in enumerate(generators):
        channels = 1 if bool(gray[i]) else c
        n = torch.randn((channels, h, w), generator=g, device=img.device, dtype=img.dtype)
        noise.append(n.expand(c, h, w))
    return (img + sigma * torch.stack(noise)).clamp(0, 1)


def add_poisson_noise(
    img: torch.Tensor,
    scale: torch.Tensor | Sequence[float],
    gray: torch.Tensor | Sequence[bool],
    generators: Sequence[torch.Generator],
    levels: float = POISSON_LEVELS,
) -> torch.Tensor:
    """Shot noise as BasicSR ``generate_poisson_noise_pt``, clamped to [0, 1].

    x8 = round(x * 255) / 255 (of the luma image if ``gray``); noise = Poisson(x8 * L) / L - x8;
    out = img + scale * noise. L = ``levels`` (see :data:`POISSON_LEVELS` for the deviation).

    Args:
        img: [B, C, H, W] in [0, 1].
        scale: [B] noise scale (Real-ESRGAN: [0.05, 3]).
        gray: [B] bool; gray noise is computed on the luma image and shared by all channels.
        generators: B generators on ``img.device``.
    """
    b, c, h, w = img.shape
    scale = torch.as_tensor(scale, dtype=img.dtype, device=img.device).view(b, 1, 1, 1)
    noise = []
    for i, g in enumerate(generators):
        src = _gray(img[i : i + 1])[0] if bool(gray[i]) else img[i]
        quantised = (src.clamp(0, 1) * 255).round() / 255
        counts = torch.poisson(quantised * levels, generator=g)
        noise.append((counts / levels - quantised).expand(c, h, w))
    return (img + scale * torch.stack(noise)).clamp(0, 1)

"""Additive Gaussian and Poisson (shot) noise with per-sample strength and generators.

Each sample's noise is drawn at that sample's own size from its own generator, so it does not
depend on the batch it is in. Outputs are new tensors clamped to [0, 1] (BasicSR ``clip=True``,
``rounds=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# ITU-R BT.601 luma weights. BasicSR's gray noise uses torchvision's ``rgb_to_grayscale``, whose
# red weight is 0.2989 (TORCHVISION_LUMA); bir's default is the standard's 0.299.
BT601_LUMA = (0.299, 0.587, 0.114)
TORCHVISION_LUMA = (0.2989, 0.587, 0.114)

# Poisson "photon count" per unit intensity. BasicSR counts the unique 8-bit values of each image
# and uses 2 ** ceil(log2(count)) (a sort per image); that count is 256 for any image with more
# than 128 distinct levels (almost every natural crop), so bir fixes it to 256. ``levels="unique"``
# selects BasicSR's per-image count.
POISSON_LEVELS = 256.0


def _gray(img: torch.Tensor, weights: Sequence[float] = BT601_LUMA) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma w0 R + w1 G + w2 B (single-channel inputs pass through).

    Summed in torchvision's order, so ``TORCHVISION_LUMA`` gives ``rgb_to_grayscale`` bit for bit.
    """
    if img.shape[1] == 1:
        return img
    w0, w1, w2 = (float(w) for w in weights)
    return (w0 * img[:, 0:1] + w1 * img[:, 1:2] + w2 * img[:, 2:3]).to(img.dtype)


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


def unique_levels(level_index: torch.Tensor) -> float:
    """BasicSR's count for one image: 2 ** ceil(log2(number of distinct 8-bit levels))."""
    count = int((torch.bincount(level_index.reshape(-1), minlength=256) > 0).sum())
    return float(2 ** math.ceil(math.log2(count)))


def add_poisson_noise(
    img: torch.Tensor,
    scale: torch.Tensor | Sequence[float],
    gray: torch.Tensor | Sequence[bool],
    generators: Sequence[torch.Generator],
    levels: float | str = POISSON_LEVELS,
    gray_weights: Sequence[float] = BT601_LUMA,
) -> torch.Tensor:
    """Shot noise as BasicSR ``generate_poisson_noise_pt``, clamped to [0, 1].

    x8 = round(x * 255) / 255 (of the luma image if ``gray``); noise = Poisson(x8 * L) / L - x8;
    out = img + scale * noise.

    Args:
        img: [B, C, H, W] in [0, 1].
        scale: [B] noise scale (Real-ESRGAN: [0.05, 3]).
        gray: [B] bool; gray noise is computed on the luma image and shared by all channels.
        generators: B generators on ``img.device``.
        levels: L, a number (bir: 256, see :data:`POISSON_LEVELS`) or "unique": BasicSR's
            2 ** ceil(log2(distinct 8-bit values)) of each image (of its luma image if gray).
        gray_weights: luma weights of the gray image (BasicSR: :data:`TORCHVISION_LUMA`).

    (An exact inverse-CDF sampler by table lookup, one table per L for the 256 possible means,
    was measured against ``torch.poisson``: 16.8 vs 10.2 ms per 256 x 256 x 3 image on one
    thread, so ``torch.poisson`` stays.)
    """
    if not (levels == "unique" or (isinstance(levels, (int, float)) and levels > 0)):
        raise ValueError(f"Poisson levels must be a positive number or 'unique', got {levels!r}")
    b, c, h, w = img.shape
    scale = torch.as_tensor(scale, dtype=img.dtype, device=img.device).view(b, 1, 1, 1)
    noise = []
    for i, g in enumerate(generators):
        src = _gray(img[i : i + 1], gray_weights)[0] if bool(gray[i]) else img[i]
        index = (src.clamp(0, 1) * 255).round()
        quantised = index / 255
        index = index.long()
        n_levels = unique_levels(index) if levels == "unique" else float(levels)
        counts = torch.poisson(quantised * n_levels, generator=g)
        noise.append((counts / n_levels - quantised).expand(c, h, w))
    return (img + scale * torch.stack(noise)).clamp(0, 1)

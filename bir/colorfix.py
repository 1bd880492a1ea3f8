"""Colour correction of a diffusion output against the stage-1 restoration.

Latent diffusion shifts colours slightly; DiffBIR (after StableSR) keeps the *high* frequencies of
the diffusion output and takes the *low* frequencies (or the per-channel statistics) from the
stage-1 image, whose colours are faithful to the input.

- :func:`wavelet_color_fix`: à-trous wavelet split with ``levels`` dilated 3x3 binomial blurs
  (dilation 1, 2, 4, ..., replicate padding); ``out = high(content) + low(style)``.
- :func:`adain_color_fix`: adaptive instance normalisation (Huang & Belongie 2017):
  per-channel mean/std of ``content`` replaced by those of ``style``.

Both work on ``[B, C, H, W]`` tensors of any range; bir calls them on images in [0, 1] and clamps
the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# 3x3 binomial (B3-spline-like) low-pass used by the à-trous transform: outer([1,2,1]/4)
_BINOMIAL_3x3 = ((0.0625, 0.125, 0.0625), (0.125, 0.25, 0.125), (0.0625, 0.125, 0.0625))


def wavelet_blur(image: Tensor, dilation: int) -> Tensor:
    """Depthwise 3x3 binomial blur with ``dilation``, replicate padding (size preserved).

    Args:
        image: ``[B, C, H, W]``.
        dilation: spacing of the kernel taps (1, 2, 4, ... for the levels of the transform).
    """
    channels = image.shape[1]
    kernel = torch.tensor(_BINOMIAL_3x3, dtype=image.dtype, device=image.device)
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_decomposition(image: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """Split ``image`` into (high, low) with ``image == high + low`` exactly.

    ``low`` is ``image`` blurred successively with dilations 1, 2, ..., 2**(levels-1); ``high``
    is the sum of the detail bands, i.e. ``image - low``.
    """
    low = image
    for level in range(levels):
        low = wavelet_blur(low, 2**level)
    return image - low, low


def wavelet_color_fix(content: Tensor, style: Tensor, levels: int = 5) -> Tensor:
    """High frequencies of ``content`` plus low frequencies of ``style``.

    Args:
        content: the diffusion output ``[B, C, H, W]`` (details to keep).
        style: the stage-1 output, same shape (colours to keep).
        levels: number of wavelet levels (DiffBIR: 5, low-pass support 63 px).
    """
    if content.shape != style.shape:
        raise ValueError(
            f"colour fix needs equal shapes, got {tuple(content.shape)} and {tuple(style.shape)}"
        )
    content_high, _ = wavelet_decomposition(content, levels)
    _, style_low = wavelet_decomposition(style, levels)
    return content_high + style_low


def channel_mean_std(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and std (unbiased variance + ``eps``), ``[B, C, 1, 1]`` each."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN: ``(content - mean_c) / std_c * std_s + mean_s`` per sample and channel.

    ``style`` may have a different spatial size than ``content`` (only its statistics are used).
    """
    c_mean, c_std = channel_mean_std(content, eps)
    s_mean, s_std = channel_mean_std(style, eps)
    return (content - c_mean) / c_std * s_std + s_mean


def color_fix(content: Tensor, style: Tensor, kind: str | None = "wavelet") -> Tensor:
    """Dispatch on ``kind``: ``wavelet`` | ``adain`` | ``none``/None (content unchanged)."""
    if kind in (None, "none"):
        return content
    if kind == "wavelet":
        return wavelet_color_fix(content, style)
    if kind == "adain":
        return adain_color_fix(content, style)
    raise ValueError(f"unknown colour fix {kind!r}; expected wavelet, adain or none")

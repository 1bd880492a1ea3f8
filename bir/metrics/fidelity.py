"""Fidelity metrics: PSNR and SSIM per image, RGB or BT.601 Y, BasicSR conventions.

They follow BasicSR ``calculate_psnr``/``calculate_ssim`` (and therefore skimage with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``): values are computed on the
[0, 255] scale, SSIM uses an 11x11 Gaussian window (sigma 1.5) over the *valid* region with
K1 = 0.01, K2 = 0.03, RGB SSIM is the mean of the per-channel SSIMs, and the Y channel is
ITU-R BT.601 ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (RGB in [0, 1], Y in [16, 235]).
Deviation: BasicSR rounds to 8-bit first (its inputs are uint8 files); here float inputs are used
as given, so round them yourself to reproduce 8-bit figures exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bir.operators.blur import gaussian_kernel

# BT.601 luma weights for RGB in [0, 1] giving Y on the [0, 255] scale (BasicSR rgb2ycbcr).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

# SSIM's window (Wang et al. 2004): 11 x 11 Gaussian, sigma 1.5.
_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5


def rgb_to_y(x: Tensor) -> Tensor:
    """BT.601 luma as BasicSR ``rgb2ycbcr(y_only=True)``.

    Args:
        x: ``[B, 3, H, W]`` RGB in [0, 1].
    Returns:
        ``[B, 1, H, W]`` Y on the [0, 255] scale (16 for black, 235 for white).
    """
    w = x.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) + _Y_OFFSET


def _prepare(
    x: Tensor, y: Tensor, crop_border: int, y_channel: bool, data_range: float
) -> tuple[Tensor, Tensor]:
    """Check shapes, crop borders, convert to Y or scale to [0, 255]; float64."""
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] batches, got shape {tuple(x.shape)}")
    x, y = x.double(), y.to(x.device).double()
    if crop_border > 0:
        c = crop_border
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
        if x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"crop_border={crop_border} leaves an empty image")
    x, y = x / data_range, y / data_range
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError("y_channel=True needs RGB inputs")
        return rgb_to_y(x), rgb_to_y(y)
    return x * 255.0, y * 255.0


def psnr(
    x: Tensor,
    y: Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(255^2 / MSE)`` on the [0, 255] scale.

    Args:
        x, y: ``[B, C, H, W]`` in [0, data_range].
        crop_border: pixels removed from every side first.
        y_channel: compare BT.601 Y (BasicSR ``test_y_channel``) instead of all channels.
    Returns:
        ``Tensor[B]`` float64 in dB; ``inf`` where the images are identical (summaries leave it
        out of the mean and count it: :mod:`bir.metrics.summary`).
    """
    a, b = _prepare(x, y, crop_border, y_channel, data_range)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def ssim(
    x: Tensor,
    y: Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13) as BasicSR ``calculate_ssim``.

    Gaussian window 11, sigma 1.5 (:func:`bir.operators.blur.gaussian_kernel`, the outer product
    of cv2's normalised 1-D window), valid region only, C1 = (0.01 * 255)^2,
    C2 = (0.03 * 255)^2, population (not sample) covariance; multi-channel images average the
    per-channel SSIMs.

    Args:
        x, y: ``[B, C, H, W]`` in [0, data_range], at least 11x11 after cropping.
    Returns:
        ``Tensor[B]`` float64, 1 for identical images.
    """
    a, b = _prepare(x, y, crop_border, y_channel, data_range)
    k = _SSIM_WINDOW
    if min(a.shape[-2:]) < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k}, got {tuple(a.shape[-2:])}")
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    channels = a.shape[1]
    win = gaussian_kernel(k, _SSIM_SIGMA, dtype=torch.float64).to(a.device)
    win = win.expand(channels, 1, k, k).contiguous()

    def blur(t: Tensor) -> Tensor:  # depthwise, valid region (BasicSR crops 5 px after filter2D)
        return F.conv2d(t, win, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)

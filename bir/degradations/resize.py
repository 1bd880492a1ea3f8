"""Per-sample resizing.

Every sample gets its own scale and mode, so output sizes differ across a batch: the resize is
applied per sample (a loop of ``F.interpolate`` calls, one per image) and returns a list. The
other ops are batched on a padded canvas (``filters.pad_to_canvas``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RESIZE_MODES = ("area", "bilinear", "bicubic")


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize [B, C, H, W] to ``size`` (h, w) with ``mode`` in area / bilinear / bicubic.

    align_corners=False and no antialiasing, as ``F.interpolate`` in Real-ESRGAN. Bicubic can
    overshoot [0, 1]; callers clamp later, as the reference does.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(img.shape[-2:]) == size:
        return img.clone()
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, size=size, mode=mode, **kwargs)


def resize_by_factor(img: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """Resize [B, C, H, W] with ``F.interpolate(scale_factor=scale)`` as BasicSR's stage 1 does.

    The output is floor(H * scale) x floor(W * scale), as with :func:`resize` to that size, but
    bilinear / bicubic map output pixel x to input (x + 0.5) / scale - 0.5 (the given scale, not
    the ratio of the sizes). A scale of 1 returns a copy.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if scale == 1:
        return img.clone()
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, scale_factor=float(scale), mode=mode, **kwargs)


def random_resize(
    images: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    modes: Sequence[str],
) -> list[torch.Tensor]:
    """Resize each [1, C, h, w] image to its own ``sizes[i]`` with ``modes[i]``: list of [1, C, h', w']."""
    return [resize(x, s, m) for x, s, m in zip(images, sizes, modes)]

"""Per-sample filtering: reflect padding, ``filter2d`` and unsharp-mask sharpening.

Padding is "reflect" (mirror without repeating the edge pixel: OpenCV's BORDER_REFLECT_101,
torch's ``mode="reflect"``) extended periodically, so a pad larger than the image is still
defined (torch's reflect pad refuses it; OpenCV reflects repeatedly, as here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reflect_indices(
    n: int, before: int, after: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Source indices for reflect-padding a length-``n`` axis by ``before`` / ``after``: LongTensor[n+before+after]."""
    idx = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad(img: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Reflect-pad the last two dims of ``img`` [..., H, W]; pads may exceed the image size."""
    h, w = img.shape[-2:]
    if max(left, right) < w and max(top, bottom) < h:  # the native kernel handles this case
        flat = img.reshape(-1, 1, h, w) if img.ndim != 4 else img
        out = F.pad(flat, (left, right, top, bottom), mode="reflect")
        return out.reshape(*img.shape[:-2], *out.shape[-2:])
    rows = reflect_indices(h, top, bottom, img.device)
    cols = reflect_indices(w, left, right, img.device)
    return img.index_select(-2, rows).index_select(-1, cols)


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each sample with its own kernel (correlation, as BasicSR ``filter2D`` / cv2.filter2D).

    Args:
        img: [B, C, H, W] float.
        kernels: [B, k, k] (one kernel per sample, shared by its channels) or [k, k]; k odd.
    Returns:
        [B, C, H, W], reflect padding (k // 2 on every side), computed as one grouped convolution.
    """
    if kernels.ndim == 2:
        kernels = kernels.unsqueeze(0).expand(img.shape[0], -1, -1)
    b, c, h, w = img.shape
    k = kernels.shape[-1]
    if kernels.shape != (b, k, k) or k % 2 != 1:
        raise ValueError(f"expected kernels [B={b}, k, k] with odd k, got {tuple(kernels.shape)}")
    pad = k // 2
    return filter2d_valid(reflect_pad(img, pad, pad, pad, pad), kernels)


def filter2d_valid(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample correlation without padding: [B, C, H, W] * [B, k, k] -> [B, C, H-k+1, W-k+1].

    One grouped convolution: the batch becomes channels, one group per (sample, channel).
    """
    b, c, h, w = padded.shape
    k = kernels.shape[-1]
    weight = kernels.to(padded.dtype).repeat_interleave(c, dim=0).unsqueeze(1)
    out = F.conv2d(padded.reshape(1, b * c, h, w), weight, groups=b * c)
    return out.view(b, c, h - k + 1, w - k + 1)


def gaussian_kernel_1d(
    ksize: int, sigma: float = 0.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """OpenCV ``getGaussianKernel``: sigma <= 0 means 0.3 * ((ksize - 1) / 2 - 1) + 0.8. [ksize], sums to 1.

    (OpenCV uses fixed tables for ksize <= 7 with sigma <= 0; callers here use ksize >= 9.)
    """
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = torch.arange(ksize, dtype=dtype) - (ksize - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def usm_sharp(
    img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10.0
) -> torch.Tensor:
    """Unsharp-mask sharpening as BasicSR ``usm_sharp`` / ``USMSharp`` (used on Real-ESRGAN GT).

    residual = img - G*img (Gaussian of size ``radius`` (+1 if even), OpenCV default sigma);
    mask = |residual| * 255 > threshold, softened by the same Gaussian;
    out = soft * clamp(img + weight * residual, 0, 1) + (1 - soft) * img.

    Args:
        img: [B, C, H, W] in [0, 1]. Returns a new tensor of the same shape, in [0, 1].
    """
    if radius % 2 == 0:
        radius += 1
    k1 = gaussian_kernel_1d(radius).to(img.device)
    kernel = torch.outer(k1, k1).to(img.dtype)
    blur = filter2d(img, kernel)
    residual = img - blur
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = filter2d(mask, kernel)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def pad_to_canvas(
    images: list[torch.Tensor], multiple: int = 1, replicate_multiple: int = 1
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack images of different sizes into one batch by padding each at the bottom/right.

    Each image [1, C, h, w] is first edge-replicated to a multiple of ``replicate_multiple`` (how
    JPEG pads to whole MCUs), then reflect-extended (periodically) to the common canvas size, which
    is the largest size rounded up to ``multiple``. A local operation (``filter2d``, 8x8-block
    JPEG) on the canvas, cropped back, equals the operation on each image alone: reflect
    extension is exactly the reflect padding ``filter2d`` would apply.

    Returns:
        canvas [B, C, Hc, Wc] and the original sizes [(h, w)].
    """
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    if len(set(sizes)) == 1 and all(s % multiple == 0 for s in sizes[0]):
        return torch.cat(images, dim=0), sizes

    def up(v: int, m: int) -> int:
        return int(math.ceil(v / m) * m)

    hc = up(max(h for h, _ in sizes), multiple)
    wc = up(max(w for _, w in sizes), multiple)
    padded = []
    for x, (h, w) in zip(images, sizes):
        if replicate_multiple > 1:
            x = F.pad(
                x,
                (0, up(w, replicate_multiple) - w, 0, up(h, replicate_multiple) - h),
                mode="replicate",
            )
        padded.append(reflect_pad(x, 0, wc - x.shape[-1], 0, hc - x.shape[-2]))
    return torch.cat(padded, dim=0), sizes


def crop_from_canvas(canvas: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`pad_to_canvas`: the top-left ``(h, w)`` of each sample, as [1, C, h, w]."""
    return [canvas[i : i + 1, :, :h, :w] for i, (h, w) in enumerate(sizes)]

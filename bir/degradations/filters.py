"""Per-sample filtering: reflect padding, ``filter2d`` and unsharp-mask sharpening.

Padding is "reflect" (mirror without repeating the edge pixel: OpenCV's BORDER_REFLECT_101,
torch's ``mode="reflect"``) extended periodically, so a pad larger than the image is still
defined (torch's reflect pad refuses it; OpenCV reflects repeatedly, as here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bir.operators.blur import convolve_per_image, gaussian_kernel


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


# Kernels of at least this size are applied by FFT: a depthwise convolution costs
# ~k^2 per pixel, the FFT's cost does not depend on k. Measured on the CPU at 16 x 3 x 256 x 256
# (1 and 2 threads): direct 21x21 50-84 ms, 25x25 66-95, 31x31 111-138, 41x41 226-294; FFT
# 66-142. So Real-ESRGAN's kernels (<= 21) stay direct; DiffBIR v1's 41x41 blur and the USM
# Gaussian (51) go by FFT. Also measured, not kept: cropping zero-padded kernels to their support
# and filtering per size (70 vs 58 ms for one 21x21 convolution of the batch), and two 1-D
# convolutions for the separable (isotropic Gaussian) kernels of a batch (3x faster for those
# alone, no gain once the batch is split and gathered: 51-65 vs 56-60 ms).
FFT_MIN_SIZE = 27


def flush_subnormal(kernels: torch.Tensor) -> torch.Tensor:
    """Kernel entries below the smallest normal float of their dtype set to zero.

    Gaussian tails of small-sigma kernels land in the subnormal range (e.g. exp(-100) in
    float32), and subnormal operands make x86 convolution ~3x slower (238 vs 71 ms for 16
    Real-ESRGAN kernels on 256 px). Dropping them changes no output by more than 1e-38.
    """
    if not kernels.is_floating_point():
        return kernels
    tiny = torch.finfo(kernels.dtype).tiny
    return torch.where(kernels.abs() < tiny, torch.zeros_like(kernels), kernels)


def _fft_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def correlate_valid(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample correlation without padding: [B, C, H, W] * [B, k, k] -> [B, C, H-k+1, W-k+1].

    Kernels of size >= :data:`FFT_MIN_SIZE` by FFT: the circular convolution with the flipped
    kernel on a grid of at least H x W equals the linear one on the valid region (no wrap-around
    reaches it); equal to the direct sum up to float32 round-off (~1e-6). Smaller kernels by one
    grouped convolution (:func:`filter2d_valid`).
    """
    k = kernels.shape[-1]
    if k < FFT_MIN_SIZE:
        return filter2d_valid(padded, kernels)
    h, w = padded.shape[-2:]
    size = (_fft_size(h), _fft_size(w))
    spectrum = torch.fft.rfft2(padded, s=size)
    kernel_spectrum = torch.fft.rfft2(kernels.flip(-2, -1).to(padded.dtype), s=size)
    out = torch.fft.irfft2(spectrum * kernel_spectrum[:, None], s=size)
    return out[..., k - 1 : h, k - 1 : w].contiguous()


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each sample with its own kernel (correlation, as BasicSR ``filter2D`` / cv2.filter2D).

    Args:
        img: [B, C, H, W] float.
        kernels: [B, k, k] (one kernel per sample, shared by its channels) or [k, k]; k odd.
    Returns:
        [B, C, H, W], reflect padding (k // 2 on every side); one grouped convolution, or FFT
        for k >= :data:`FFT_MIN_SIZE` (:func:`correlate_valid`).
    """
    if kernels.ndim == 2:
        kernels = kernels.unsqueeze(0).expand(img.shape[0], -1, -1)
    b, c, h, w = img.shape
    k = kernels.shape[-1]
    if kernels.shape != (b, k, k) or k % 2 != 1:
        raise ValueError(f"expected kernels [B={b}, k, k] with odd k, got {tuple(kernels.shape)}")
    pad = k // 2
    return correlate_valid(reflect_pad(img, pad, pad, pad, pad), kernels)


def filter2d_valid(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample correlation without padding: [B, C, H, W] * [B, k, k] -> [B, C, H-k+1, W-k+1].

    One grouped convolution (:func:`bir.operators.blur.convolve_per_image`, ``valid``); subnormal
    kernel entries are flushed to zero first (:func:`flush_subnormal`).
    """
    weight = flush_subnormal(kernels.to(padded.dtype))[:, None]
    return convolve_per_image(padded, weight, "valid", correlate=True)


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
    sigma = 0.3 * ((radius - 1) * 0.5 - 1) + 0.8  # OpenCV getGaussianKernel's default (sigma 0)
    kernel = gaussian_kernel(radius, sigma, dtype=img.dtype).to(img.device)
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

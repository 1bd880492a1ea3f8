"""BasicSR's Real-ESRGAN batch degradation, run from the installed ``basicsr`` package (reference).

Used by ``scripts/bench_degradations.py`` as the "BasicSR batch pipeline" and by the degradation
tests as an independent implementation. Two halves, as in BasicSR's training:

- :func:`draw_kernels` draws one sample's three kernels the way ``RealESRGANDataset.__getitem__``
  does (numpy / ``random`` global state; ``random_mixed_kernels`` and ``circular_lowpass_kernel``
  from ``basicsr.data.degradations``; padded to 21);
- :func:`degrade_batch` applies ``RealESRGANModel.feed_data``'s synthesis to a batch with
  BasicSR's own ops (``filter2D``, ``random_add_gaussian_noise_pt``, ``random_add_poisson_noise_pt``,
  ``DiffJPEG``, ``F.interpolate``): the resize direction, scale and mode, the Gaussian-or-Poisson
  choice, the second-blur coin and the final order are drawn once per batch; noise strength,
  gray flag and JPEG quality per sample.

Not included: USM sharpening of the GT (off in DiffBIR, ``use_sharpener: false``), the random crop
and the training-pair queue (they reorder samples, they do not degrade them). DiffBIR's
``RealESRGANBatchTransform`` adds the resize back to the GT size (bicubic) and rounding, done
here when ``resize_back`` is set.

The numbers default to DiffBIR's / Real-ESRGAN's training options (``REAL_ESRGAN_OPT``).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

REAL_ESRGAN_OPT = {
    "scale": 4,
    "kernel_range": [2 * v + 1 for v in range(3, 11)],  # 7 .. 21
    "kernel_list": [
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    ],
    "kernel_prob": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    "sinc_prob": 0.1,
    "blur_sigma": [0.2, 3.0],
    "betag_range": [0.5, 4.0],
    "betap_range": [1.0, 2.0],
    "kernel_list2": [
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    ],
    "kernel_prob2": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    "sinc_prob2": 0.1,
    "blur_sigma2": [0.2, 1.5],
    "betag_range2": [0.5, 4.0],
    "betap_range2": [1.0, 2.0],
    "final_sinc_prob": 0.8,
    "resize_prob": [0.2, 0.7, 0.1],
    "resize_range": [0.15, 1.5],
    "gaussian_noise_prob": 0.5,
    "noise_range": [1, 30],
    "poisson_scale_range": [0.05, 3],
    "gray_noise_prob": 0.4,
    "jpeg_range": [30, 95],
    "second_blur_prob": 0.8,
    "resize_prob2": [0.3, 0.4, 0.3],
    "resize_range2": [0.3, 1.2],
    "gaussian_noise_prob2": 0.5,
    "noise_range2": [1, 25],
    "poisson_scale_range2": [0.05, 2.5],
    "gray_noise_prob2": 0.4,
    "jpeg_range2": [30, 95],
}


def _one_kernel(opt: dict, suffix: str) -> np.ndarray:
    """A blur kernel as ``RealESRGANDataset`` draws it (``suffix`` "" or "2"), padded to 21."""
    from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels

    size = random.choice(opt["kernel_range"])
    if np.random.uniform() < opt["sinc_prob" + suffix]:
        omega_c = np.random.uniform(np.pi / 3 if size < 13 else np.pi / 5, np.pi)
        kernel = circular_lowpass_kernel(omega_c, size, pad_to=False)
    else:
        kernel = random_mixed_kernels(
            opt["kernel_list" + suffix],
            opt["kernel_prob" + suffix],
            size,
            opt["blur_sigma" + suffix],
            opt["blur_sigma" + suffix],
            [-math.pi, math.pi],
            opt["betag_range" + suffix],
            opt["betap_range" + suffix],
            noise_range=None,
        )
    pad = (21 - size) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def draw_kernels(opt: dict = REAL_ESRGAN_OPT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's (kernel1, kernel2, sinc_kernel), each [21, 21] float32, as the dataset does."""
    from basicsr.data.degradations import circular_lowpass_kernel

    kernel1 = _one_kernel(opt, "")
    kernel2 = _one_kernel(opt, "2")
    if np.random.uniform() < opt["final_sinc_prob"]:
        size = random.choice(opt["kernel_range"])
        omega_c = np.random.uniform(np.pi / 3, np.pi)
        sinc = torch.FloatTensor(circular_lowpass_kernel(omega_c, size, pad_to=21))
    else:
        sinc = torch.zeros(21, 21)
        sinc[10, 10] = 1
    return torch.FloatTensor(kernel1), torch.FloatTensor(kernel2), sinc


def _random_resize(out: torch.Tensor, probs, scale_range) -> tuple[torch.Tensor, float, str]:
    updown = random.choices(["up", "down", "keep"], probs)[0]
    if updown == "up":
        scale = np.random.uniform(1, scale_range[1])
    elif updown == "down":
        scale = np.random.uniform(scale_range[0], 1)
    else:
        scale = 1
    return updown, scale, random.choice(["area", "bilinear", "bicubic"])


def _noise(out: torch.Tensor, opt: dict, suffix: str) -> torch.Tensor:
    from basicsr.data.degradations import random_add_gaussian_noise_pt, random_add_poisson_noise_pt

    gray_prob = opt["gray_noise_prob" + suffix]
    if np.random.uniform() < opt["gaussian_noise_prob" + suffix]:
        return random_add_gaussian_noise_pt(
            out,
            sigma_range=opt["noise_range" + suffix],
            clip=True,
            rounds=False,
            gray_prob=gray_prob,
        )
    return random_add_poisson_noise_pt(
        out,
        scale_range=opt["poisson_scale_range" + suffix],
        gray_prob=gray_prob,
        clip=True,
        rounds=False,
    )


@torch.no_grad()
def degrade_batch(
    gt: torch.Tensor,
    kernel1: torch.Tensor,
    kernel2: torch.Tensor,
    sinc_kernel: torch.Tensor,
    jpeger,
    opt: dict = REAL_ESRGAN_OPT,
    resize_back: bool = True,
) -> torch.Tensor:
    """``RealESRGANModel.feed_data``'s second-order synthesis on ``gt`` [B, 3, H, W] in [0, 1].

    kernel1, kernel2, sinc_kernel: [B, 21, 21]; jpeger: ``basicsr.utils.DiffJPEG(False)``.
    Returns the LQ [B, 3, H / scale, W / scale] (or [B, 3, H, W] with ``resize_back``), 8-bit levels.
    """
    from basicsr.utils.img_process_util import filter2D

    ori_h, ori_w = gt.shape[2:4]
    out = filter2D(gt, kernel1)
    _, scale, mode = _random_resize(out, opt["resize_prob"], opt["resize_range"])
    out = F.interpolate(out, scale_factor=scale, mode=mode)
    out = _noise(out, opt, "")
    jpeg_p = out.new_zeros(out.size(0)).uniform_(*opt["jpeg_range"])
    out = jpeger(torch.clamp(out, 0, 1), quality=jpeg_p)

    if np.random.uniform() < opt["second_blur_prob"]:
        # BasicSR's DiffJPEG returns a permuted (channels-last strided) tensor, which its filter2D
        # cannot ``view`` on the CPU: made contiguous first (no change in values).
        out = filter2D(out.contiguous(), kernel2)
    _, scale, mode = _random_resize(out, opt["resize_prob2"], opt["resize_range2"])
    size = (int(ori_h / opt["scale"] * scale), int(ori_w / opt["scale"] * scale))
    out = F.interpolate(out, size=size, mode=mode)
    out = _noise(out, opt, "2")

    lq_size = (ori_h // opt["scale"], ori_w // opt["scale"])
    if np.random.uniform() < 0.5:
        out = F.interpolate(out, size=lq_size, mode=random.choice(["area", "bilinear", "bicubic"]))
        out = filter2D(out, sinc_kernel)
        jpeg_p = out.new_zeros(out.size(0)).uniform_(*opt["jpeg_range2"])
        out = jpeger(torch.clamp(out, 0, 1), quality=jpeg_p)
    else:
        jpeg_p = out.new_zeros(out.size(0)).uniform_(*opt["jpeg_range2"])
        out = jpeger(torch.clamp(out, 0, 1), quality=jpeg_p)
        out = F.interpolate(out, size=lq_size, mode=random.choice(["area", "bilinear", "bicubic"]))
        out = filter2D(out.contiguous(), sinc_kernel)
    lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
    if resize_back:  # DiffBIR's RealESRGANBatchTransform
        lq = F.interpolate(lq, size=(ori_h, ori_w), mode="bicubic")
        lq = torch.clamp((lq * 255.0).round(), 0, 255) / 255.0
    return lq


def basicsr_pipeline(gt: torch.Tensor, jpeger, opt: dict = REAL_ESRGAN_OPT) -> torch.Tensor:
    """Kernels drawn per image (dataset) then the batch synthesis (model), as BasicSR trains."""
    kernels = [draw_kernels(opt) for _ in range(gt.shape[0])]
    k1, k2, sinc = (torch.stack(k) for k in zip(*kernels))
    return degrade_batch(gt, k1, k2, sinc, jpeger, opt)

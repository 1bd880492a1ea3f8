"""Training-time degradation pipelines: GT batch -> (LQ, GT, per-sample parameters).

Contract (docs/contracts.md): ``pipeline(gt [B, 3, H, W] in [0, 1], generators) ->
DegradationResult(lq, gt, params)``; ``lq`` is at the gt's size (resized back), rounded to 8-bit
levels and clamped to [0, 1]; ``params`` holds every parameter drawn, one JSON-able dict per
sample. Every draw for sample i comes from ``generators[i]``, in a fixed order, so sample i's
result does not depend on the batch it is in.

Batching: kernels are built in one batched call and applied as one grouped convolution, JPEG is
one batched call; images of different sizes (each sample has its own resize scale) are padded
onto a common reflect-padded canvas for the convolution (exact) and split into
16x16 MCUs for JPEG (``DiffJPEG.compress_list``, exact). Resizing and noise
drawing run per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bir.degradations.filters import (
    correlate_valid,
    crop_from_canvas,
    filter2d,
    reflect_pad,
    usm_sharp,
)
from bir.degradations.jpeg import DiffJPEG
from bir.degradations.kernels import (
    REAL_ESRGAN_KERNELS,
    draw_mixed_kernel_params,
    draw_sinc_params,
    kernels_from_params,
)
from bir.degradations.noise import (
    BT601_LUMA,
    POISSON_LEVELS,
    add_gaussian_noise,
    add_poisson_noise,
)
from bir.degradations.resize import RESIZE_MODES, resize, resize_by_factor
from bir.random import choice, uniform


@dataclass
class DegradationResult:
    """Output of a degradation pipeline.

    lq: [B, 3, H, W] in [0, 1] (8-bit levels); gt: [B, 3, H, W] in [0, 1] (sharpened if the
    pipeline sharpens GT); params: one JSON-able dict per sample with every parameter drawn.
    """

    lq: torch.Tensor
    gt: torch.Tensor
    params: list[dict] = field(default_factory=list)


def quantize_8bit(img: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels and clamp to [0, 1], as Real-ESRGAN's final step."""
    return (img * 255.0).round().clamp(0, 255) / 255.0


def _check_input(gt: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    if gt.ndim != 4 or gt.shape[1] != 3:
        raise ValueError(f"expected gt [B, 3, H, W], got {tuple(gt.shape)}")
    if len(generators) != gt.shape[0]:
        raise ValueError(
            f"need one generator per sample: {len(generators)} for a batch of {gt.shape[0]}"
        )


class IdentityDegradation(nn.Module):
    """No degradation: lq = gt (a copy, rounded to 8-bit levels). Params are empty dicts."""

    def forward(self, gt: torch.Tensor, generators: Sequence[torch.Generator]) -> DegradationResult:
        _check_input(gt, generators)
        return DegradationResult(lq=quantize_8bit(gt), gt=gt, params=[{} for _ in generators])


def _size_groups(sizes: list[tuple[int, int]], max_waste: float = 1.3) -> list[list[int]]:
    """Split ragged images into groups whose common canvas wastes little compute.

    Images sorted by area (largest first) join the current group while the group's canvas
    (max h x max w x count) stays within ``max_waste`` times the sum of their areas.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1])
    groups: list[list[int]] = []
    hc = wc = area = 0
    for i in order:
        h, w = sizes[i]
        if groups:
            nh, nw = max(hc, h), max(wc, w)
            if nh * nw * (len(groups[-1]) + 1) <= max_waste * (area + h * w):
                groups[-1].append(i)
                hc, wc, area = nh, nw, area + h * w
                continue
        groups.append([i])
        hc, wc, area = h, w, h * w
    return groups


def _filter_ragged(images: list[torch.Tensor], kernels: torch.Tensor) -> list[torch.Tensor]:
    """``filter2d`` on images of different sizes: a few grouped convolutions on reflect-padded
    canvases (images of similar size share one), each exactly equal to filtering alone."""
    if len({tuple(x.shape) for x in images}) == 1:
        return list(filter2d(torch.cat(images), kernels).split(1))
    pad = kernels.shape[-1] // 2
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    out: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for group in _size_groups(sizes):
        hc, wc = max(sizes[i][0] for i in group), max(sizes[i][1] for i in group)
        # One pad per image: the filter's reflect border plus the extension to the canvas.
        canvas = torch.cat(
            [
                reflect_pad(images[i], pad, pad + wc - sizes[i][1], pad, pad + hc - sizes[i][0])
                for i in group
            ]
        )
        filtered = crop_from_canvas(
            correlate_valid(canvas, kernels[group]), [sizes[i] for i in group]
        )
        for i, x in zip(group, filtered):
            out[i] = x
    return out


def _jpeg_ragged(
    images: list[torch.Tensor], jpeg: DiffJPEG, quality: list[float]
) -> list[torch.Tensor]:
    """JPEG on images of different sizes, one batched call over all their MCUs (exact)."""
    return jpeg.compress_list([x.clamp(0, 1) for x in images], quality)


def _draw_resize_scale(
    g: torch.Generator, probs: Sequence[float], scale_range: Sequence[float]
) -> float:
    """Real-ESRGAN: up (scale in [1, high)), down ([low, 1)) or keep (1) with ``probs``."""
    direction = choice(g, ["up", "down", "keep"], probs)
    if direction == "up":
        return uniform(g, 1.0, scale_range[1])
    if direction == "down":
        return uniform(g, scale_range[0], 1.0)
    return 1.0


def _stage_settings(
    blur_prob: float,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sinc_prob: float,
    sigma: Sequence[float],
    betag: Sequence[float],
    betap: Sequence[float],
    resize_prob: Sequence[float],
    resize_range: Sequence[float],
    gaussian_noise_prob: float,
    noise_range: Sequence[float],
    poisson_scale_range: Sequence[float],
    gray_noise_prob: float,
    jpeg_range: Sequence[float],
) -> dict:
    """One stage's draw settings of :class:`SecondOrderDegradation`, in the order of its
    arguments; config sequences become plain lists and tuples."""
    return dict(
        blur_prob=blur_prob,
        kernel_list=list(kernel_list),
        kernel_prob=list(kernel_prob),
        sinc_prob=sinc_prob,
        sigma=tuple(sigma),
        betag=tuple(betag),
        betap=tuple(betap),
        resize_prob=list(resize_prob),
        resize_range=tuple(resize_range),
        gaussian_noise_prob=gaussian_noise_prob,
        noise_range=tuple(noise_range),
        poisson_scale_range=tuple(poisson_scale_range),
        gray_noise_prob=gray_noise_prob,
        jpeg_range=tuple(jpeg_range),
    )


class SecondOrderDegradation(nn.Module):
    """Real-ESRGAN's high-order degradation model with DiffBIR's settings (Wang et al. 2021, Sec. 3).

    blur -> random resize -> noise -> JPEG, twice (the second blur with probability
    ``second_blur_prob``), then in random order (50/50) [resize to H/scale + sinc filter] and
    JPEG; finally resized back to the GT size (``resize_back_mode``, DiffBIR) and rounded to 8 bit.

    Deviations from the reference (BasicSR's ``RealESRGANModel.feed_data``), on purpose; the
    ones marked (*) are options whose BasicSR setting reproduces the released training data
    (``conf/degradation/second_order_basicsr.yaml``):
    - every parameter (incl. resize direction, scale and mode, which Real-ESRGAN draws once per
      batch) is drawn per sample from that sample's generator: each sample's distribution is
      the reference's, only the correlation within a batch is gone;
    - (*) ``stage1_resize="size"``: stage-1 resize targets floor(H * scale) by ``size=``
      (the reference, "scale_factor", maps coordinates with the scale instead of the size ratio);
    - (*) ``poisson_levels=256``: Poisson noise with a fixed 256 levels (``noise.POISSON_LEVELS``;
      the reference, "unique", counts each image's distinct 8-bit values), gray noise from BT.601
      luma (the reference uses torchvision's 0.2989 red weight: ``gray_weights``);
    - (*) ``jpeg_convention="libjpeg"``: JPEG tables as libjpeg, edge padding (see
      ``jpeg.DiffJPEG``), integer qualities (``jpeg_integer_quality``; the reference draws a
      continuous quality);
    - no training-pair shuffle queue (it would mix samples across batches and break per-sample
      reproducibility).

    All other constructor arguments are the Real-ESRGAN / DiffBIR defaults.
    """

    def __init__(
        self,
        scale: int = 4,
        resize_back: bool = True,
        resize_back_mode: str = "bicubic",
        use_sharpener: bool = False,
        usm_weight: float = 0.5,
        usm_radius: int = 50,
        usm_threshold: float = 10.0,
        kernel_sizes: Sequence[int] = (7, 9, 11, 13, 15, 17, 19, 21),
        kernel_pad_to: int = 21,
        kernel_list: Sequence[str] = REAL_ESRGAN_KERNELS,
        kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
        sinc_prob: float = 0.1,
        blur_sigma: Sequence[float] = (0.2, 3.0),
        betag_range: Sequence[float] = (0.5, 4.0),
        betap_range: Sequence[float] = (1.0, 2.0),
        resize_prob: Sequence[float] = (0.2, 0.7, 0.1),
        resize_range: Sequence[float] = (0.15, 1.5),
        resize_modes: Sequence[str] = RESIZE_MODES,
        gaussian_noise_prob: float = 0.5,
        noise_range: Sequence[float] = (1.0, 30.0),
        poisson_scale_range: Sequence[float] = (0.05, 3.0),
        gray_noise_prob: float = 0.4,
        jpeg_range: Sequence[float] = (30.0, 95.0),
        second_blur_prob: float = 0.8,
        kernel_list2: Sequence[str] = REAL_ESRGAN_KERNELS,
        kernel_prob2: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
        sinc_prob2: float = 0.1,
        blur_sigma2: Sequence[float] = (0.2, 1.5),
        betag_range2: Sequence[float] = (0.5, 4.0),
        betap_range2: Sequence[float] = (1.0, 2.0),
        resize_prob2: Sequence[float] = (0.3, 0.4, 0.3),
        resize_range2: Sequence[float] = (0.3, 1.2),
        gaussian_noise_prob2: float = 0.5,
        noise_range2: Sequence[float] = (1.0, 25.0),
        poisson_scale_range2: Sequence[float] = (0.05, 2.5),
        gray_noise_prob2: float = 0.4,
        jpeg_range2: Sequence[float] = (30.0, 95.0),
        final_sinc_prob: float = 0.8,
        final_sinc_cutoff: Sequence[float] = (math.pi / 3, math.pi),
        jpeg_convention: str = "libjpeg",
        jpeg_padding: str | None = None,
        jpeg_integer_quality: bool = True,
        poisson_levels: float | str = POISSON_LEVELS,
        gray_weights: Sequence[float] = BT601_LUMA,
        stage1_resize: str = "size",
    ) -> None:
        super().__init__()
        if resize_back_mode not in RESIZE_MODES:
            raise ValueError(f"resize_back_mode must be one of {RESIZE_MODES}")
        if stage1_resize not in ("size", "scale_factor"):
            raise ValueError(
                f"stage1_resize must be 'size' or 'scale_factor', got {stage1_resize!r}"
            )
        if not (poisson_levels == "unique" or isinstance(poisson_levels, (int, float))):
            raise ValueError(f"poisson_levels must be a number or 'unique', got {poisson_levels!r}")
        self.stage1_resize = stage1_resize
        self.jpeg_integer_quality = jpeg_integer_quality
        self.poisson_levels = (
            poisson_levels if poisson_levels == "unique" else float(poisson_levels)
        )
        self.gray_weights = tuple(float(w) for w in gray_weights)
        self.scale, self.resize_back, self.resize_back_mode = scale, resize_back, resize_back_mode
        self.use_sharpener = use_sharpener
        self.usm = dict(weight=usm_weight, radius=usm_radius, threshold=usm_threshold)
        self.kernel_sizes, self.kernel_pad_to = list(kernel_sizes), kernel_pad_to
        self.resize_modes = list(resize_modes)
        self.final_sinc_prob, self.final_sinc_cutoff = final_sinc_prob, tuple(final_sinc_cutoff)
        self.stages = [  # the arguments above, stage by stage
            _stage_settings(
                *(1.0, kernel_list, kernel_prob, sinc_prob, blur_sigma, betag_range, betap_range),
                *(resize_prob, resize_range, gaussian_noise_prob, noise_range),
                *(poisson_scale_range, gray_noise_prob, jpeg_range),
            ),
            _stage_settings(
                *(second_blur_prob, kernel_list2, kernel_prob2, sinc_prob2, blur_sigma2),
                *(betag_range2, betap_range2, resize_prob2, resize_range2, gaussian_noise_prob2),
                *(noise_range2, poisson_scale_range2, gray_noise_prob2, jpeg_range2),
            ),
        ]
        self.jpeg = DiffJPEG(differentiable=False, convention=jpeg_convention, padding=jpeg_padding)

    def _quality(self, g: torch.Generator, quality_range: Sequence[float]) -> float:
        q = uniform(g, *quality_range)
        return round(q) if self.jpeg_integer_quality else q

    def draw_params(self, g: torch.Generator) -> dict:
        """Every random parameter of one sample, drawn in a fixed order from ``g`` (JSON-able)."""
        params: dict = {}
        for n, st in enumerate(self.stages, start=1):
            p: dict = {}
            p["blur"] = n == 1 or uniform(g, 0.0, 1.0) < st["blur_prob"]
            p["kernel"] = draw_mixed_kernel_params(
                g,
                st["kernel_list"],
                st["kernel_prob"],
                self.kernel_sizes,
                st["sigma"],
                (-math.pi, math.pi),
                st["betag"],
                st["betap"],
                st["sinc_prob"],
            )
            p["resize_scale"] = _draw_resize_scale(g, st["resize_prob"], st["resize_range"])
            p["resize_mode"] = choice(g, self.resize_modes)
            p["gray_noise"] = uniform(g, 0.0, 1.0) < st["gray_noise_prob"]
            if uniform(g, 0.0, 1.0) < st["gaussian_noise_prob"]:
                p["noise"], p["noise_sigma"] = "gaussian", uniform(g, *st["noise_range"])
            else:
                p["noise"], p["poisson_scale"] = "poisson", uniform(g, *st["poisson_scale_range"])
            p["jpeg_quality"] = self._quality(g, st["jpeg_range"])
            params[f"stage{n}"] = p
        params["final_sinc"] = draw_sinc_params(
            g, self.final_sinc_prob, self.kernel_sizes, self.final_sinc_cutoff
        )
        params["final_resize_mode"] = choice(g, self.resize_modes)
        params["sinc_before_jpeg"] = uniform(g, 0.0, 1.0) < 0.5
        params["final_jpeg_quality"] = self._quality(g, self.stages[1]["jpeg_range"])
        return params

    def _stage(
        self,
        images: list[torch.Tensor],
        params: list[dict],
        generators: Sequence[torch.Generator],
        target_sizes: list[tuple[int, int]],
        by_factor: bool = False,
    ) -> list[torch.Tensor]:
        """Blur -> resize -> noise -> JPEG for one stage (``params`` are that stage's dicts).

        ``by_factor``: resize with ``scale_factor=`` (BasicSR's stage 1) instead of ``size=``.
        """
        device = images[0].device
        blur = [i for i, p in enumerate(params) if p["blur"]]
        if blur:
            kernels = kernels_from_params(
                [params[i]["kernel"] for i in blur], self.kernel_pad_to, device
            )
            blurred = _filter_ragged([images[i] for i in blur], kernels)
            images = list(images)
            for i, x in zip(blur, blurred):
                images[i] = x
        if by_factor:
            images = [
                resize_by_factor(x, p["resize_scale"], p["resize_mode"])
                for x, p in zip(images, params)
            ]
        else:
            images = [
                resize(x, s, p["resize_mode"]) for x, s, p in zip(images, target_sizes, params)
            ]
        noisy = []
        for x, p, g in zip(images, params, generators):
            if p["noise"] == "gaussian":
                noisy.append(
                    add_gaussian_noise(x, [p["noise_sigma"] / 255.0], [p["gray_noise"]], [g])
                )
            else:
                noisy.append(
                    add_poisson_noise(
                        x,
                        [p["poisson_scale"]],
                        [p["gray_noise"]],
                        [g],
                        levels=self.poisson_levels,
                        gray_weights=self.gray_weights,
                    )
                )
        return _jpeg_ragged(noisy, self.jpeg, [p["jpeg_quality"] for p in params])

    def forward(self, gt: torch.Tensor, generators: Sequence[torch.Generator]) -> DegradationResult:
        _check_input(gt, generators)
        if self.use_sharpener:
            gt = usm_sharp(gt, **self.usm)
        params = [self.draw_params(g) for g in generators]
        h, w = gt.shape[-2:]
        images = list(gt.split(1, dim=0))

        # Stage 1: sizes relative to the current image (Real-ESRGAN: scale_factor=scale).
        sizes1 = [
            (int(h * p["stage1"]["resize_scale"]), int(w * p["stage1"]["resize_scale"]))
            for p in params
        ]
        images = self._stage(
            images,
            [p["stage1"] for p in params],
            generators,
            sizes1,
            by_factor=self.stage1_resize == "scale_factor",
        )
        # Stage 2: sizes relative to the final LQ size H / scale (Real-ESRGAN).
        sizes2 = [
            (
                int(h / self.scale * p["stage2"]["resize_scale"]),
                int(w / self.scale * p["stage2"]["resize_scale"]),
            )
            for p in params
        ]
        images = self._stage(images, [p["stage2"] for p in params], generators, sizes2)

        # Final: [resize to H / scale + sinc] and JPEG, in a per-sample random order.
        lq_size = (h // self.scale, w // self.scale)
        sinc = kernels_from_params([p["final_sinc"] for p in params], self.kernel_pad_to, gt.device)
        final_quality = [p["final_jpeg_quality"] for p in params]
        first = [p["sinc_before_jpeg"] for p in params]
        out: list[torch.Tensor] = [torch.empty(0)] * len(params)
        for sinc_first in (True, False):
            idx = [i for i, f in enumerate(first) if f == sinc_first]
            if not idx:
                continue
            xs = [images[i] for i in idx]
            q = [final_quality[i] for i in idx]
            if sinc_first:
                xs = [resize(x, lq_size, params[i]["final_resize_mode"]) for x, i in zip(xs, idx)]
                xs = _filter_ragged(xs, sinc[idx])
                xs = _jpeg_ragged(xs, self.jpeg, q)
            else:
                xs = _jpeg_ragged(xs, self.jpeg, q)
                xs = [resize(x, lq_size, params[i]["final_resize_mode"]) for x, i in zip(xs, idx)]
                xs = _filter_ragged(xs, sinc[idx])
            for i, x in zip(idx, xs):
                out[i] = x
        lq = quantize_8bit(torch.cat(out, dim=0))
        if self.resize_back:
            lq = quantize_8bit(resize(lq, (h, w), self.resize_back_mode))
        return DegradationResult(lq=lq, gt=gt, params=params)


class SingleStageDegradation(nn.Module):
    """DiffBIR v1's single-stage degradation (CodeFormer style): blur -> downsample -> noise ->
    JPEG -> resize back, rounded to 8 bit.

    Defaults are DiffBIR v1's general preset; the face preset is ``blur_sigma=(0.1, 10)``,
    ``downsample_range=(0.8, 8)``, ``noise_range=(0, 20)``, ``jpeg_range=(60, 100)``.
    The reference runs per image in OpenCV (cv2.filter2D with BORDER_REFLECT_101, cv2.resize
    INTER_LINEAR, libjpeg); here the same steps run batched in torch (reflect padding, bilinear
    without antialiasing, :class:`DiffJPEG` with libjpeg tables; JPEG quality rounded to an
    integer as the reference's ``int(quality)``).
    """

    def __init__(
        self,
        blur_kernel_size: int = 41,
        kernel_list: Sequence[str] = ("iso", "aniso"),
        kernel_prob: Sequence[float] = (0.5, 0.5),
        blur_sigma: Sequence[float] = (0.1, 12.0),
        rotation_range: Sequence[float] = (-math.pi, math.pi),
        betag_range: Sequence[float] = (0.5, 4.0),
        betap_range: Sequence[float] = (1.0, 2.0),
        downsample_range: Sequence[float] = (1.0, 12.0),
        downsample_mode: str = "bilinear",
        noise_range: Sequence[float] | None = (0.0, 15.0),
        gray_noise_prob: float = 0.0,
        jpeg_range: Sequence[float] | None = (30.0, 100.0),
        resize_back_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        if blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
        self.blur_kernel_size = blur_kernel_size
        self.kernel_list, self.kernel_prob = list(kernel_list), list(kernel_prob)
        self.blur_sigma, self.rotation_range = tuple(blur_sigma), tuple(rotation_range)
        self.betag_range, self.betap_range = tuple(betag_range), tuple(betap_range)
        self.downsample_range, self.downsample_mode = tuple(downsample_range), downsample_mode
        self.noise_range = None if noise_range is None else tuple(noise_range)
        self.gray_noise_prob = gray_noise_prob
        self.jpeg_range = None if jpeg_range is None else tuple(jpeg_range)
        self.resize_back_mode = resize_back_mode
        self.jpeg = DiffJPEG(differentiable=False)

    def draw_params(self, g: torch.Generator) -> dict:
        """Every random parameter of one sample, drawn in a fixed order from ``g`` (JSON-able)."""
        params = {
            "kernel": draw_mixed_kernel_params(
                g,
                self.kernel_list,
                self.kernel_prob,
                [self.blur_kernel_size],
                self.blur_sigma,
                self.rotation_range,
                self.betag_range,
                self.betap_range,
                sinc_prob=0.0,
            ),
            "downsample_scale": uniform(g, *self.downsample_range),
        }
        if self.noise_range is not None:
            params["noise_sigma"] = uniform(g, *self.noise_range)
            params["gray_noise"] = uniform(g, 0.0, 1.0) < self.gray_noise_prob
        if self.jpeg_range is not None:
            params["jpeg_quality"] = int(uniform(g, *self.jpeg_range))
        return params

    def forward(self, gt: torch.Tensor, generators: Sequence[torch.Generator]) -> DegradationResult:
        _check_input(gt, generators)
        params = [self.draw_params(g) for g in generators]
        h, w = gt.shape[-2:]
        kernels = kernels_from_params(
            [p["kernel"] for p in params], self.blur_kernel_size, gt.device
        )
        blurred = filter2d(gt, kernels)
        # cv2.resize(img, (int(w // s), int(h // s))) in the reference.
        images = [
            resize(
                blurred[i : i + 1],
                (int(h // p["downsample_scale"]), int(w // p["downsample_scale"])),
                self.downsample_mode,
            )
            for i, p in enumerate(params)
        ]
        if self.noise_range is not None:
            images = [
                add_gaussian_noise(x, [p["noise_sigma"] / 255.0], [p["gray_noise"]], [g])
                for x, p, g in zip(images, params, generators)
            ]
        else:
            images = [x.clamp(0, 1) for x in images]
        if self.jpeg_range is not None:
            images = _jpeg_ragged(images, self.jpeg, [p["jpeg_quality"] for p in params])
        lq = torch.cat([resize(x, (h, w), self.resize_back_mode) for x in images], dim=0)
        return DegradationResult(lq=quantize_8bit(lq), gt=gt, params=params)

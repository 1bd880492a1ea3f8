"""Batched JPEG compression in torch with per-sample quality (DiffJPEG).

Pipeline (baseline JPEG, JFIF colour): RGB [0, 255] -> YCbCr (BT.601 full range) -> 4:2:0 chroma
subsampling (2x2 mean) -> 8x8 blocks, level shift -128 -> orthonormal 2-D DCT-II -> divide by the
quantisation table, round -> multiply back -> inverse DCT -> chroma upsampling (2x nearest) ->
RGB, clamp to [0, 255].

Two conventions (``convention=``):
- "libjpeg" (bir's default): the ITU-T T.81 Annex K tables scaled by quality as libjpeg
  ``jpeg_quality_scaling`` does: S = 5000 / q (q < 50) or 200 - 2q,
  Q = floor((Q_base * S + 50) / 100) clamped to [1, 255] (baseline), luminance table in its
  standard orientation, so quality q means what it means to libjpeg / OpenCV / PIL; partial MCUs
  padded to 16 by edge replication, as libjpeg pads them.
- "basicsr": BasicSR's ``DiffJPEG`` (``basicsr/utils/diffjpeg.py``), with which Real-ESRGAN and
  DiffBIR were trained: the luminance table transposed, Q = Q_base * S / 100 without flooring or
  clamping (so q >= 100 is undefined there: factor 0), zero padding to 16. On random images the
  two conventions differ by up to ~0.5.
Both: the quality tensor is never modified in place (BasicSR's ``quality_to_factor`` rewrites
it). ``padding=`` overrides the convention's padding ("edge" or "zero").
Remaining differences to libjpeg: float DCT, nearest (not "fancy") chroma upsampling, no
integer rounding of the YCbCr planes and of the decoded pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ITU-T T.81 Annex K.1, natural (row = vertical frequency) order.
LUMA_QUANT_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_QUANT_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# JFIF RGB -> YCbCr (offset 128 on chroma) and its inverse.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
_YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136, -0.714136),
    (1.0, 1.772, 0.0),
)


JPEG_CONVENTIONS = ("libjpeg", "basicsr")
JPEG_PADDINGS = ("edge", "zero")


def quality_scaled_tables(
    quality: torch.Tensor, convention: str = "libjpeg"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quality scaling of the Annex K tables: (luma [B, 8, 8], chroma [B, 8, 8]) float64.

    Args:
        quality: [B] JPEG quality. "libjpeg": clamped to [1, 100], integers reproduce libjpeg
            exactly. "basicsr": used as given (BasicSR draws it from a continuous range), < 100.
        convention: "libjpeg" (floor, clamp to [1, 255]) or "basicsr" (Q_base^T * S / 100).
    """
    if convention not in JPEG_CONVENTIONS:
        raise ValueError(f"JPEG convention must be one of {JPEG_CONVENTIONS}, got {convention!r}")
    q = quality.detach().to(torch.float64).view(-1, 1, 1)
    if convention == "libjpeg":
        q = q.clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = []
    for base in (LUMA_QUANT_TABLE, CHROMA_QUANT_TABLE):
        base_t = torch.tensor(base, dtype=torch.float64, device=quality.device)
        if convention == "libjpeg":
            tables.append(torch.floor((base_t * scale + 50.0) / 100.0).clamp(1, 255))
        else:  # BasicSR: transposed tables (row = horizontal frequency), factor S / 100
            tables.append(base_t.T * (scale / 100.0))
    return tables[0], tables[1]


def dct_matrix(n: int = 8, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n, n], D[u, x] = a(u) cos((2x + 1) u pi / 2n); JPEG's FDCT is D X D^T."""
    x = torch.arange(n, dtype=torch.float64)
    u = x.view(-1, 1)
    d = torch.cos((2 * x + 1) * u * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


class DiffJPEG(nn.Module):
    """JPEG encode-decode of a batch with per-sample quality; see the module docstring.

    Args:
        differentiable: round with ``round(x) + (x - round(x))^3`` (Shin & Song 2017, as BasicSR)
            so gradients reach the input; False uses exact rounding.
        convention: "libjpeg" (bir) or "basicsr" (Real-ESRGAN / DiffBIR training): the
            quantisation tables and the default padding, see the module docstring.
        padding: "edge" or "zero" padding of partial 16x16 MCUs; None: the convention's
            (libjpeg: edge, basicsr: zero).

    Call: ``jpeg(img [B, 3, H, W] in [0, 1], quality Tensor[B])`` -> [B, 3, H, W] in [0, 1].
    Neither input is modified.
    """

    def __init__(
        self, differentiable: bool = False, convention: str = "libjpeg", padding: str | None = None
    ) -> None:
        super().__init__()
        if convention not in JPEG_CONVENTIONS:
            raise ValueError(
                f"DiffJPEG convention must be one of {JPEG_CONVENTIONS}, got {convention!r}"
            )
        if padding is None:
            padding = "edge" if convention == "libjpeg" else "zero"
        if padding not in JPEG_PADDINGS:
            raise ValueError(f"DiffJPEG padding must be one of {JPEG_PADDINGS}, got {padding!r}")
        self.differentiable, self.convention, self.padding = differentiable, convention, padding
        d = dct_matrix(8, dtype=torch.float64)
        self.register_buffer("dct_2d", torch.kron(d, d).float(), persistent=False)
        self.register_buffer("rgb_to_ycbcr", torch.tensor(_RGB_TO_YCBCR), persistent=False)
        self.register_buffer("ycbcr_to_rgb", torch.tensor(_YCBCR_TO_RGB), persistent=False)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.round(x)
        return r + (x - r) ** 3 if self.differentiable else r

    def _codec_mcus(
        self, mcus: torch.Tensor, luma: torch.Tensor, chroma: torch.Tensor
    ) -> torch.Tensor:
        """Encode-decode whole MCUs: [N, 3, 16, 16] RGB in [0, 255] with one table pair per MCU.

        Everything JPEG does is local to a 16x16 MCU here (4:2:0 averaging, 8x8 DCT, nearest
        chroma upsampling), so MCUs of different images (and qualities) share one batch exactly.
        luma, chroma: [N, 64] quantisation tables (row-major). Returns [N, 3, 16, 16], clamped.
        """
        n = mcus.shape[0]
        dtype = mcus.dtype
        basis = self.dct_2d.to(dtype)
        ycc = torch.matmul(self.rgb_to_ycbcr.to(dtype), mcus.reshape(n, 3, 256))  # [N, 3, 256]
        y = ycc[:, 0].reshape(n, 2, 8, 2, 8).transpose(2, 3).reshape(n * 4, 64)  # 4 luma blocks
        cbcr = ycc[:, 1:].reshape(n * 2, 8, 2, 8, 2).mean(dim=(2, 4)).reshape(n * 2, 64)
        blocks = torch.cat([y - 128.0, cbcr], dim=0)  # chroma: +128 offset and -128 shift cancel
        tables = torch.cat(
            [luma.to(dtype).repeat_interleave(4, 0), chroma.to(dtype).repeat_interleave(2, 0)]
        )
        # Row-major vec(D X D^T) = (D kron D) vec(X): the 2-D DCT of all blocks is one GEMM.
        coeffs = self._round((blocks @ basis.T) / tables) * tables
        blocks = coeffs @ basis
        y = (blocks[: n * 4] + 128.0).reshape(n, 2, 2, 8, 8).transpose(2, 3).reshape(n, 1, 256)
        cbcr = blocks[n * 4 :].reshape(n * 2, 8, 1, 8, 1).expand(n * 2, 8, 2, 8, 2)
        ycc = torch.cat([y, cbcr.reshape(n, 2, 256)], dim=1)
        rgb = torch.matmul(self.ycbcr_to_rgb.to(dtype), ycc)
        return rgb.clamp(0, 255).reshape(n, 3, 16, 16)

    def _to_mcus(self, img: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (H, W not necessarily multiples of 16) -> [B * nh * nw, 3, 16, 16] in
        [0, 255], partial MCUs filled by edge replication (libjpeg) or zeros (BasicSR)."""
        b, _, h, w = img.shape
        pad_h, pad_w = (-h) % 16, (-w) % 16
        mode = "replicate" if self.padding == "edge" else "constant"
        x = F.pad(img, (0, pad_w, 0, pad_h), mode=mode) if pad_h or pad_w else img
        nh, nw = x.shape[-2] // 16, x.shape[-1] // 16
        x = (x * 255.0).reshape(b, 3, nh, 16, nw, 16).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b * nh * nw, 3, 16, 16)

    @staticmethod
    def _from_mcus(mcus: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        nh, nw = -(-h // 16), -(-w // 16)
        x = mcus.reshape(b, nh, nw, 3, 16, 16).permute(0, 3, 1, 4, 2, 5)
        return (x.reshape(b, 3, nh * 16, nw * 16) / 255.0)[:, :, :h, :w]

    def _tables(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(luma [N, 64], chroma [N, 64]) for qualities [N] in this module's convention."""
        if self.convention == "basicsr" and bool((quality >= 100).any()):
            raise ValueError(
                "DiffJPEG(convention='basicsr') needs quality < 100 (its table factor is 0 at "
                "100); lower the JPEG quality range"
            )
        luma, chroma = quality_scaled_tables(quality, self.convention)
        return luma.reshape(-1, 64), chroma.reshape(-1, 64)

    def forward(self, img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        if c != 3:
            raise ValueError(f"DiffJPEG expects RGB images [B, 3, H, W], got {tuple(img.shape)}")
        quality = torch.as_tensor(quality, device=img.device).reshape(-1).expand(b)
        luma, chroma = self._tables(quality)
        mcus = self._to_mcus(img)
        per_image = mcus.shape[0] // b
        out = self._codec_mcus(
            mcus, luma.repeat_interleave(per_image, 0), chroma.repeat_interleave(per_image, 0)
        )
        return self._from_mcus(out, b, h, w)

    def compress_list(self, images: list[torch.Tensor], quality) -> list[torch.Tensor]:
        """JPEG of images of different sizes ([1, 3, h_i, w_i] each) in one batched call.

        Equal to calling the module on each image alone: all their MCUs go through one codec
        call, so no work is spent on padding to a common size.
        """
        if not images:
            return []
        for x in images:
            if x.ndim != 4 or x.shape[:2] != (1, 3):
                raise ValueError(f"compress_list expects [1, 3, h, w] images, got {tuple(x.shape)}")
        quality = torch.as_tensor(quality, device=images[0].device).reshape(-1)
        quality = quality.expand(len(images))
        luma, chroma = self._tables(quality)
        mcus = [self._to_mcus(x) for x in images]
        counts = torch.tensor([m.shape[0] for m in mcus], device=luma.device)
        out = self._codec_mcus(
            torch.cat(mcus),
            luma.repeat_interleave(counts, 0),
            chroma.repeat_interleave(counts, 0),
        )
        return [
            self._from_mcus(o, 1, int(x.shape[-2]), int(x.shape[-1]))
            for o, x in zip(out.split(counts.tolist()), images)
        ]

"""Batched JPEG compression in torch with per-sample quality (DiffJPEG).

Pipeline (baseline JPEG, JFIF colour): RGB [0, 255] -> YCbCr (BT.601 full range) -> 4:2:0 chroma
subsampling (2x2 mean) -> 8x8 blocks, level shift -128 -> orthonormal 2-D DCT-II -> divide by the
quantisation table, round -> multiply back -> inverse DCT -> chroma upsampling (2x nearest) ->
RGB, clamp to [0, 255].

Quantisation tables are the ITU-T T.81 Annex K tables scaled by quality as libjpeg
``jpeg_quality_scaling`` does: S = 5000 / q (q < 50) or 200 - 2q, Q = floor((Q_base * S + 50) / 100)
clamped to [1, 255] (baseline). Deviations from BasicSR's ``DiffJPEG``, on purpose:
- the luminance table is used in its standard orientation (BasicSR transposes it) and scaled and
  clamped as libjpeg (BasicSR multiplies by S / 100 without flooring or clamping), so quality q
  here means what it means to libjpeg / OpenCV / PIL;
- images are padded to a multiple of 16 by edge replication, as libjpeg pads partial MCUs
  (BasicSR pads with zeros);
- the quality tensor is never modified in place (BasicSR's ``quality_to_factor`` rewrites it).
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


def quality_scaled_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg quality scaling of the Annex K tables: (luma [B, 8, 8], chroma [B, 8, 8]) float.

    Args:
        quality: [B] JPEG quality in [1, 100] (integers reproduce libjpeg exactly).
    """
    q = quality.detach().to(torch.float64).clamp(1, 100).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = []
    for base in (LUMA_QUANT_TABLE, CHROMA_QUANT_TABLE):
        base_t = torch.tensor(base, dtype=torch.float64, device=quality.device)
        tables.append(torch.floor((base_t * scale + 50.0) / 100.0).clamp(1, 255))
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

    Call: ``jpeg(img [B, 3, H, W] in [0, 1], quality Tensor[B])`` -> [B, 3, H, W] in [0, 1].
    Neither input is modified.
    """

    def __init__(self, differentiable: bool = False) -> None:
        super().__init__()
        self.differentiable = differentiable
        d = dct_matrix(8, dtype=torch.float64)
        self.register_buffer("dct_2d", torch.kron(d, d).float(), persistent=False)
        self.register_buffer("rgb_to_ycbcr", torch.tensor(_RGB_TO_YCBCR), persistent=False)
        self.register_buffer("ycbcr_to_rgb", torch.tensor(_YCBCR_TO_RGB), persistent=False)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.round(x)
        return r + (x - r) ** 3 if self.differentiable else r

    def _compress_plane(self, plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Quantise one plane [B, H, W] (H, W multiples of 8, values in [0, 255]) block-wise and decode it."""
        b, h, w = plane.shape
        # The 2-D DCT of every 8x8 block is a stride-8 convolution with the 64 DCT basis images
        # (row-major vec(D X D^T) = (D kron D) vec(X)); the inverse is the transposed convolution.
        basis = self.dct_2d.to(plane.dtype).view(64, 1, 8, 8)
        coeffs = F.conv2d((plane - 128.0).unsqueeze(1), basis, stride=8)  # [B, 64, H/8, W/8]
        q = table.to(plane.dtype).view(b, 64, 1, 1)
        coeffs = self._round(coeffs / q) * q
        return F.conv_transpose2d(coeffs, basis, stride=8).squeeze(1) + 128.0

    def forward(self, img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        if c != 3:
            raise ValueError(f"DiffJPEG expects RGB images [B, 3, H, W], got {tuple(img.shape)}")
        quality = torch.as_tensor(quality, device=img.device).reshape(-1).expand(b)
        luma_table, chroma_table = quality_scaled_tables(quality)
        pad_h, pad_w = (-h) % 16, (-w) % 16
        x = F.pad(img, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else img
        x = torch.einsum("ij,bjhw->bihw", self.rgb_to_ycbcr.to(x.dtype), x * 255.0)
        y, cbcr = x[:, 0], x[:, 1:] + 128.0
        cbcr = F.avg_pool2d(cbcr, kernel_size=2, stride=2)  # 4:2:0
        y = self._compress_plane(y, luma_table)
        hc, wc = cbcr.shape[-2:]
        cbcr = self._compress_plane(
            cbcr.reshape(b * 2, hc, wc), chroma_table.repeat_interleave(2, 0)
        )
        cbcr = cbcr.view(b, 2, hc, wc).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        ycc = torch.cat([y.unsqueeze(1), cbcr - 128.0], dim=1)
        rgb = torch.einsum("ij,bjhw->bihw", self.ycbcr_to_rgb.to(x.dtype), ycc)
        return (rgb.clamp(0, 255) / 255.0)[:, :, :h, :w]

"""RRDBNet (ESRGAN generator), as BSRNet: DiffBIR v2's stage 1 for blind super-resolution.

ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks (Wang et al., ECCV-W 2018) built
the residual-in-residual dense block (RRDB) generator; BSRGAN (Zhang et al., "Designing a
Practical Degradation Model for Deep Blind Image Super-Resolution", ICCV 2021,
arXiv:2103.14006) trained it with its random shuffle of degradations and a PSNR loss, and
published the result as ``BSRNet.pth`` (KAIR releases). DiffBIR v2 uses that file unchanged
(``diffbir/model/bsrnet.py``, ``configs/inference/bsrnet.yaml``: in_nc 3, out_nc 3, nf 64, nb 23,
gc 32, sf 4).

Architecture (x: [B, in_nc, H, W]):

    f0 = conv_first(x)                                   3x3, in_nc -> nf
    f  = f0 + trunk_conv(RRDB_trunk(f0))                 nb RRDBs, then 3x3 conv
    f  = lrelu(upconv_k(nearest_2x(f)))                  k = 1 (sf 2) or 1, 2 (sf 4)
    y  = conv_last(lrelu(HRconv(f)))                      3x3 nf -> nf, 3x3 nf -> out_nc

RRDB(f) = f + 0.2 * RDB3(RDB2(RDB1(f))); a residual dense block with growth ``gc`` is

    x_k = lrelu(conv_k(cat(f, x_1, ..., x_{k-1})))       k = 1..4, (nf + (k-1) gc) -> gc
    RDB(f) = f + 0.2 * conv5(cat(f, x_1, ..., x_4))      (nf + 4 gc) -> nf

with LeakyReLU slope 0.2 everywhere. Parameter names are those of the release
(``conv_first``, ``RRDB_trunk.i.RDBj.convk``, ``trunk_conv``, ``upconv1``, ``upconv2``,
``HRconv``, ``conv_last``), so ``BSRNet.pth`` loads with ``strict=True``; there are no buffers.
The network is fully convolutional: any H, W works without padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: where BSRGAN's authors publish the weights DiffBIR v2 uses (named when the file is missing)
BSRNET_URL = "https://github.com/cszn/KAIR/releases/download/v1.0/BSRNet.pth"

#: residual scaling of ESRGAN's dense blocks and RRDBs
RESIDUAL_SCALE = 0.2


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs with a scaled residual (ESRGAN's ``ResidualDenseBlock_5C``).

    ``forward(f: [B, nf, H, W]) -> [B, nf, H, W]``.
    """

    def __init__(self, nf: int = 64, gc: int = 32, bias: bool = True):
        super().__init__()
        for k in range(1, 5):
            setattr(self, f"conv{k}", nn.Conv2d(nf + (k - 1) * gc, gc, 3, 1, 1, bias=bias))
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1, bias=bias)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        # ESRGAN's initialisation: Kaiming-normal (fan_in) scaled by 0.1, zero bias, so every
        # block starts close to the identity
        for k in range(1, 6):
            conv = getattr(self, f"conv{k}")
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            with torch.no_grad():
                conv.weight.mul_(0.1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        feats = [f]
        for k in range(1, 5):
            feats.append(self.lrelu(getattr(self, f"conv{k}")(torch.cat(feats, 1))))
        return f + RESIDUAL_SCALE * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks and a scaled outer residual."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + RESIDUAL_SCALE * self.RDB3(self.RDB2(self.RDB1(f)))


class RRDBNet(nn.Module):
    """ESRGAN's RRDB generator; with the defaults, BSRGAN's ``BSRNet`` (x4, PSNR-trained).

    ``forward(x: Tensor[B, in_nc, H, W] in [0, 1]) -> Tensor[B, out_nc, H*sf, W*sf]``, nominally
    in [0, 1] but not clamped (DiffBIR v2 feeds the raw output to the VAE; clamp for display).
    Any H, W.

    Args:
        in_nc: input channels (3 for RGB).
        out_nc: output channels.
        nf: feature width of the trunk and the upsampler.
        nb: number of RRDBs in the trunk (23 in BSRNet).
        gc: growth channels of the dense blocks.
        sf: upscaling factor, 2 or 4 (one or two nearest-2x + conv stages, as released).

    Weights: :func:`bir.nets.checkpoints.load_net` reads the bare ``BSRNet.pth`` and bir's
    checkpoints.
    """

    checkpoint_what = "BSRNet (RRDBNet)"
    checkpoint_url = BSRNET_URL

    def __init__(
        self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, sf: int = 4
    ):
        super().__init__()
        if sf not in (2, 4):
            raise ValueError(f"RRDBNet sf must be 2 or 4 (as released), got {sf}")
        self.sf = sf
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        if sf == 4:
            self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv_first(x)
        f = f + self.trunk_conv(self.RRDB_trunk(f))
        for name in ("upconv1", "upconv2")[: 1 if self.sf == 2 else 2]:
            f = self.lrelu(getattr(self, name)(F.interpolate(f, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.HRconv(f)))

"""The DDPM / DDIM pixel UNet (Ho et al. 2020; ermongroup/ddim ``models/diffusion.py``).

Used by the CelebA-HQ 256 priors (SDEdit / DDIM releases, BIRD). Parameter names follow the
release (``temb.dense.{0,1}``, ``conv_in``, ``down.i.block.j``, ``down.i.attn.j``,
``down.i.downsample.conv``, ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``up.i.block.j``,
``up.i.attn.j``, ``up.i.upsample.conv``, ``norm_out``, ``conv_out``) so its bare state dicts load
with ``strict=True`` through :func:`bir.nets.checkpoints.load_net` (a DataParallel ``module.``
prefix is stripped).

The residual block, resamplers, middle block and the down / up paths (:class:`EncoderLevels`,
:class:`DecoderLevels`) are defined here once; ldm's VAE (:mod:`bir.nets.vae`) builds its
``Encoder``/``Decoder`` from them without the timestep embedding and without skip connections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bir.nets.attention import SpatialSelfAttention


def ddpm_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's sinusoidal embedding (sin half first, frequencies ``10000 ** (-j / (half - 1))``).

    Differs from :func:`bir.nets.unet.timestep_embedding` (cos first, ``/ half``) as in the
    original TensorFlow DDPM code. ``timesteps``: ``[B]`` -> ``[B, dim]`` float32.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=timesteps.device)
        * -(math.log(10000.0) / (half - 1))
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6), the ``Normalize`` of DDPM and ldm's VAE."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """DDPM residual block (keys ``norm1``, ``conv1``, ``temb_proj``, ``norm2``, ``conv2``,
    ``nin_shortcut`` / ``conv_shortcut``).

    Args:
        in_channels: input channels.
        out_channels: output channels (default ``in_channels``).
        conv_shortcut: 3x3 instead of 1x1 conv on the skip path when channels change.
        dropout: dropout before ``conv2``.
        temb_channels: timestep-embedding channels; 0 builds no ``temb_proj`` (VAE).

    ``forward(x [B, C, H, W], temb [B, T] | None) -> [B, out_channels, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class Upsample(nn.Module):
    """Nearest 2x upsampling, optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """2x downsampling: asymmetric zero pad (right/bottom by 1) + stride-2 3x3 conv without
    padding (the TF "SAME" emulation of the release), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class MidBlock(nn.Module):
    """The bottom of the UNet and of the VAE's encoder and decoder: ResnetBlock, self-attention,
    ResnetBlock (keys ``block_1``, ``attn_1``, ``block_2``); ``temb`` as :class:`ResnetBlock`."""

    def __init__(self, channels: int, dropout: float = 0.0, temb_channels: int = 0):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, temb_channels=temb_channels)
        self.attn_1 = SpatialSelfAttention(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, temb_channels=temb_channels)

    def forward(self, h: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


class EncoderLevels(nn.ModuleList):
    """The down path: level ``i`` holds ``block.j`` (``num_res_blocks`` ResnetBlocks to
    ``ch * ch_mult[i]`` channels), ``attn.j`` (self-attention after each block at the feature
    sizes in ``attn_resolutions``) and, except on the last level, ``downsample``.

    ``out_channels`` / ``out_resolution``: channels and feature size at the bottom.
    ``forward(h [B, ch, H, W], temb, skips) -> [B, out_channels, H/f, W/f]``; with a list
    ``skips`` every block's and resampler's output is appended to it (the UNet's skips).
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        temb_channels: int = 0,
    ):
        super().__init__()
        in_ch_mult = (1, *ch_mult)
        curr_res, block_in = resolution, ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            for _ in range(num_res_blocks):
                stage.block.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, temb_channels=temb_channels)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    stage.attn.append(SpatialSelfAttention(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.append(stage)
        self.out_channels, self.out_resolution = block_in, curr_res

    def forward(
        self,
        h: torch.Tensor,
        temb: torch.Tensor | None = None,
        skips: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for level, stage in enumerate(self):
            for i, block in enumerate(stage.block):
                h = block(h, temb)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
                if skips is not None:
                    skips.append(h)
            if level != len(self) - 1:
                h = stage.downsample(h)
                if skips is not None:
                    skips.append(h)
        return h


class DecoderLevels(nn.ModuleList):
    """The up path, indexed by level as :class:`EncoderLevels` and run from the bottom: level ``i``
    holds ``block.j`` (``num_res_blocks + 1`` ResnetBlocks to ``ch * ch_mult[i]`` channels),
    ``attn.j`` and, except on level 0, ``upsample``.

    Args:
        in_channels: channels at the bottom; ``resolution``: feature size there.
        skip_connections: every block also takes the matching :class:`EncoderLevels` output,
            concatenated on channels (the UNet; the VAE decoder has none).

    ``forward(h, temb, skips) -> [B, ch * ch_mult[0], H*f, W*f]``, popping ``skips`` (as the
    encoder filled it) when ``skip_connections``. ``out_channels``: channels at the top.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        in_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        temb_channels: int = 0,
        skip_connections: bool = False,
    ):
        super().__init__()
        in_ch_mult = (1, *ch_mult)
        curr_res, block_in = resolution, in_channels
        stages: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = skip_in = ch * ch_mult[level]
            for i in range(num_res_blocks + 1):
                if i == num_res_blocks:
                    skip_in = ch * in_ch_mult[level]  # the skip from the previous level's output
                block_in += skip_in if skip_connections else 0
                stage.block.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, temb_channels=temb_channels)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    stage.attn.append(SpatialSelfAttention(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            stages.insert(0, stage)
        self.extend(stages)
        self.out_channels = block_in

    def forward(
        self,
        h: torch.Tensor,
        temb: torch.Tensor | None = None,
        skips: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for level in reversed(range(len(self))):
            stage = self[level]
            for i, block in enumerate(stage.block):
                if skips is not None:
                    h = torch.cat([h, skips.pop()], dim=1)
                h = block(h, temb)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return h


class DDPMUNet(nn.Module):
    """The DDPM/DDIM UNet ``Model`` (ch 128, ch_mult (1,1,2,2,4,4), attention at 16 for CelebA-HQ).

    Args:
        ch: base channels.
        out_ch: output channels (3: eps).
        ch_mult: channel multiplier per level.
        num_res_blocks: ResnetBlocks per level in the encoder (decoder: one more).
        attn_resolutions: feature-map sizes (pixels) with self-attention.
        dropout: ResnetBlock dropout.
        in_channels: input channels.
        resolution: training image size; fixes where attention sits (any multiple of
            ``2 ** (len(ch_mult) - 1)`` works at run time).
        resamp_with_conv: learned convs in Up/Downsample.

    ``forward(x [B, in_channels, H, W] in [-1, 1], t [B] original timesteps) -> eps [B, out_ch, H, W]``.
    """

    checkpoint_what = "DDPM UNet"

    def __init__(
        self,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int = 256,
        resamp_with_conv: bool = True,
    ):
        super().__init__()
        self.ch = ch
        self.temb_ch = ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList(
            [nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)]
        )
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels = {
            "ch": ch,
            "ch_mult": ch_mult,
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": attn_resolutions,
            "dropout": dropout,
            "resamp_with_conv": resamp_with_conv,
            "temb_channels": self.temb_ch,
        }
        self.down = EncoderLevels(resolution=resolution, **levels)
        block_in = self.down.out_channels
        self.mid = MidBlock(block_in, dropout=dropout, temb_channels=self.temb_ch)
        self.up = DecoderLevels(
            resolution=self.down.out_resolution,
            in_channels=block_in,
            skip_connections=True,
            **levels,
        )
        block_in = self.up.out_channels
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = ddpm_timestep_embedding(t, self.ch).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]  # the skips: every encoder output, popped by the decoder
        h = self.down(hs[0], temb, skips=hs)
        h = self.up(self.mid(h, temb), temb, skips=hs)
        return self.conv_out(F.silu(self.norm_out(h)))

"""The "openaimodel" UNet of guided-diffusion (ADM) and ldm (Stable Diffusion 2.x).

One :class:`UNetModel` covers both releases with their parameter names, so

* Stable Diffusion 2.1 (``v2-1_512-ema-pruned.ckpt``, keys under ``model.diffusion_model.``) and
* guided-diffusion's ``256x256_diffusion_uncond.pt`` (bare state dict)

load with ``strict=True`` through :func:`bir.nets.checkpoints.load_net` (the prior configs) and
:meth:`bir.nets.controlldm.ControlLDM.load_sd_weights` (SD inside DiffBIR). Key layout:
``time_embed.{0,2}``, ``input_blocks.i.j``, ``middle_block.{0,1,2}``, ``output_blocks.i.j``,
``out.{0,2}``; ``ResBlock``: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``,
``skip_connection``; ``Downsample.op``, ``Upsample.conv``; ``AttentionBlock``: ``norm``, ``qkv``,
``proj_out``; ``SpatialTransformer``: see :mod:`bir.nets.attention`.

The encoder half is built by :func:`build_unet_encoder` so a ControlNet can reuse it. Every
attention uses SDPA; ``use_checkpoint`` turns on gradient checkpointing (non-reentrant).
Only 2-D convolutions (``dims=2``) and unconditional / text-conditional models (no class labels)
are implemented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from bir.nets.attention import (
    SpatialTransformer,
    maybe_checkpoint,
    qkv_attention,
    qkv_attention_legacy,
    zero_module,
)

__all__ = [
    "AttentionBlock",
    "Downsample",
    "EncoderSpec",
    "GroupNorm32",
    "ResBlock",
    "SpatialTransformer",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "build_unet_encoder",
    "build_middle_block",
    "timestep_embedding",
    "zero_module",
]


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal timestep embedding of guided-diffusion / ldm (cos half first, then sin).

    ``emb[:, j] = cos(t * f_j)``, ``emb[:, half + j] = sin(t * f_j)`` with
    ``f_j = max_period ** (-j / half)``, ``half = dim // 2``; a zero column is appended for odd ``dim``.

    Args:
        timesteps: ``[B]`` (int or float, may be fractional).
        dim: embedding size.
        max_period: controls the lowest frequency.

    Returns:
        ``[B, dim]`` float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) computed in float32 (the references' ``normalization``)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} must override forward(x, emb)")


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes ``emb`` to :class:`TimestepBlock` children and ``context`` to
    :class:`SpatialTransformer` children."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv (key ``op``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (guided-diffusion / ldm ``ResBlock``).

    Args:
        channels: input channels.
        emb_channels: timestep-embedding channels.
        dropout: dropout before the last conv.
        out_channels: output channels (default ``channels``).
        use_conv: 3x3 conv (instead of 1x1) on the skip path when channels change.
        use_scale_shift_norm: FiLM-style ``norm(h) * (1 + scale) + shift`` (ADM) instead of adding
            the embedding.
        use_checkpoint: gradient checkpointing.
        up / down: resample inside the block (``resblock_updown``), with parameter-free resamplers.

    ``forward(x [B, C, H, W], emb [B, E]) -> [B, out_channels, H', W']``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(
                channels, self.out_channels, 3 if use_conv else 1, padding=1 if use_conv else 0
            )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the norm/activation and the conv, as in the references.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """guided-diffusion ``AttentionBlock``: pixels attend to each other (fused ``qkv`` conv1d).

    Args:
        channels: feature channels ``C``.
        num_heads: heads, used when ``num_head_channels == -1``.
        num_head_channels: channels per head (overrides ``num_heads``).
        use_checkpoint: gradient checkpointing.
        use_new_attention_order: split q/k/v before heads (``QKVAttention``) instead of the
            legacy per-head interleaving (``QKVAttentionLegacy``, the released checkpoints).

    ``forward(x [B, C, H, W]) -> [B, C, H, W]`` (residual).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        attend = qkv_attention if self.use_new_attention_order else qkv_attention_legacy
        h = self.proj_out(attend(qkv, self.num_heads))
        return (x + h).reshape(b, c, *spatial)


@dataclass(frozen=True)
class EncoderSpec:
    """Architecture arguments shared by the UNet encoder, its middle block and a ControlNet."""

    model_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...]
    dropout: float = 0.0
    conv_resample: bool = True
    use_checkpoint: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    legacy: bool = True

    @classmethod
    def from_arguments(cls, arguments: dict) -> EncoderSpec:
        """The spec's fields picked by name from a constructor's arguments (e.g. ``locals()``)."""
        values = {f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}
        for key in ("attention_resolutions", "channel_mult"):
            values[key] = tuple(values[key])
        return cls(**values)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def attention(self, ch: int, num_heads: int) -> nn.Module:
        """The attention layer at a resolution with ``ch`` channels (ldm's head arithmetic)."""
        if self.num_head_channels == -1:
            dim_head = ch // num_heads
        else:
            num_heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy and self.use_spatial_transformer:
            dim_head = ch // num_heads
        if self.use_spatial_transformer:
            return SpatialTransformer(
                ch,
                num_heads,
                dim_head,
                depth=self.transformer_depth,
                dropout=self.dropout,
                context_dim=self.context_dim,
                use_linear=self.use_linear_in_transformer,
                use_checkpoint=self.use_checkpoint,
            )
        return AttentionBlock(
            ch,
            num_heads=num_heads,
            num_head_channels=dim_head if self.num_head_channels != -1 else -1,
            use_checkpoint=self.use_checkpoint,
            use_new_attention_order=self.use_new_attention_order,
        )

    def resblock(self, ch: int, out: int, **updown: bool) -> ResBlock:
        return ResBlock(
            ch,
            self.time_embed_dim,
            self.dropout,
            out_channels=out,
            use_scale_shift_norm=self.use_scale_shift_norm,
            use_checkpoint=self.use_checkpoint,
            **updown,
        )


def build_unet_encoder(
    spec: EncoderSpec, in_channels: int
) -> tuple[nn.ModuleList, list[int], int, int]:
    """The UNet's ``input_blocks``: stem conv, then per level ``num_res_blocks`` ResBlocks
    (+ attention where the downsampling factor ``ds`` is in ``attention_resolutions``) and a
    downsampler between levels.

    Returns:
        ``(input_blocks, skip_channels, ch, ds)``: the blocks, the output channels of each block
        (the skips the decoder consumes, in order), the channels and downsampling factor at the
        bottom. A ControlNet adds one zero 1x1 conv per entry of ``skip_channels``.
    """
    ch = int(spec.channel_mult[0] * spec.model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_channels, ds = [ch], 1
    for level, mult in enumerate(spec.channel_mult):
        for _ in range(spec.num_res_blocks):
            out = int(mult * spec.model_channels)
            layers: list[nn.Module] = [spec.resblock(ch, out)]
            ch = out
            if ds in spec.attention_resolutions:
                layers.append(spec.attention(ch, spec.num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(spec.channel_mult) - 1:
            down = (
                spec.resblock(ch, ch, down=True)
                if spec.resblock_updown
                else Downsample(ch, spec.conv_resample, out_channels=ch)
            )
            blocks.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
    return blocks, skip_channels, ch, ds


def build_middle_block(spec: EncoderSpec, ch: int) -> TimestepEmbedSequential:
    """``middle_block``: ResBlock, attention, ResBlock at ``ch`` channels."""
    return TimestepEmbedSequential(
        spec.resblock(ch, ch), spec.attention(ch, spec.num_heads), spec.resblock(ch, ch)
    )


class UNetModel(nn.Module):
    """The ADM / ldm UNet (Dhariwal & Nichol 2021; Rombach et al. 2022), released key names.

    Args:
        in_channels: input channels (4 for SD latents, 3 for ADM pixels).
        model_channels: base channel count (320 SD, 256 ADM-256).
        out_channels: output channels (4 SD; 6 ADM with learned sigma: eps and variance values).
        num_res_blocks: ResBlocks per level.
        attention_resolutions: downsampling factors ``ds`` with attention (SD: 4, 2, 1; ADM-256
            "32,16,8" is ``256 // res`` = 8, 16, 32).
        channel_mult: channel multiplier per level.
        dropout: dropout in ResBlocks and transformers.
        conv_resample: learned 3x3 convs in Up/Downsample.
        use_checkpoint: gradient checkpointing in every block.
        num_heads: heads when ``num_head_channels == -1``.
        num_head_channels: channels per head (64 in both releases).
        num_heads_upsample: heads in the decoder (``-1``: same as ``num_heads``).
        use_scale_shift_norm: FiLM conditioning in ResBlocks (ADM True, SD False).
        resblock_updown: resample with ResBlocks (ADM True, SD False).
        use_new_attention_order: ``QKVAttention`` instead of the legacy order.
        use_spatial_transformer: ldm ``SpatialTransformer`` instead of ``AttentionBlock`` (SD).
        transformer_depth: transformer blocks per ``SpatialTransformer``.
        context_dim: cross-attention context channels (SD 2.1: 1024).
        use_linear_in_transformer: Linear ``proj_in``/``proj_out`` (SD 2.x).
        legacy: ldm's legacy head arithmetic (SD 2.x: False).

    ``forward(x, timesteps, context=None, control=None)``:
        x: ``[B, in_channels, H, W]`` (ADM: pixels in [-1, 1]; SD: scaled VAE latents);
        timesteps: ``[B]`` original (unrespaced) timesteps;
        context: ``[B, M, context_dim]`` text tokens or None;
        control: optional list of ``len(input_blocks) + 1`` residuals (ControlNet order: one per
        input block, then the middle block); the last is added to the middle-block output, the
        others are popped from the end and added to the matching skip before concatenation.
        Returns ``[B, out_channels, H, W]``.
    """

    #: where released files put the network (bir.nets.checkpoints.net_weights): SD's ldm
    #: checkpoints; guided-diffusion's files are bare
    checkpoint_prefixes = ("model.diffusion_model.", "diffusion_model.", "model.unet.", "unet.")
    checkpoint_what = "UNet"

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        dropout: float = 0.0,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.spec = EncoderSpec.from_arguments(locals())
        spec = self.spec
        ted = spec.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted)
        )
        self.input_blocks, skip_channels, ch, ds = build_unet_encoder(spec, in_channels)
        self.middle_block = build_middle_block(spec, ch)

        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(spec.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out = int(model_channels * mult)
                layers: list[nn.Module] = [spec.resblock(ch + skip_channels.pop(), out)]
                ch = out
                if ds in spec.attention_resolutions:
                    layers.append(spec.attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(
                        spec.resblock(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            zero_module(
                nn.Conv2d(int(model_channels * spec.channel_mult[0]), out_channels, 3, padding=1)
            ),
        )

    @property
    def num_control_residuals(self) -> int:
        """How many ControlNet residuals :meth:`forward` accepts (13 for SD)."""
        return len(self.input_blocks) + 1

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        residuals = None
        if control is not None:
            if len(control) != self.num_control_residuals:
                raise ValueError(
                    f"expected {self.num_control_residuals} control residuals, got {len(control)}"
                )
            residuals = list(control)  # a copy: the caller's list is not consumed
            h = h + residuals.pop()
        for block in self.output_blocks:
            skip = skips.pop()
            if residuals is not None:
                skip = skip + residuals.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)

"""DiffBIR's LAControlNet: a trainable copy of the SD UNet encoder conditioned on a latent image.

The ControlNet (Zhang et al. 2023) as DiffBIR uses it (Lin et al. 2024, Sec. 3.2 "LAControlNet"):
the stage-1 restoration is encoded by the frozen SD VAE and *concatenated* with the noisy latent,
so the copied encoder's stem takes ``4 + 4`` channels and there is no separate hint encoder. Each
of the 12 input blocks and the middle block feeds a zero-initialised 1x1 conv; the 13 outputs are
added (times ``control_scales``) to the frozen UNet's skips and middle block.

Parameter names follow DiffBIR's released control weights (``v2.pth``; ``control_model.*`` in the
v1 full checkpoints): ``time_embed``, ``input_blocks``, ``zero_convs``, ``middle_block``,
``middle_block_out``, so they load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bir.nets.attention import zero_module
from bir.nets.unet import (
    EncoderSpec,
    TimestepEmbedSequential,
    UNetModel,
    build_middle_block,
    build_unet_encoder,
    timestep_embedding,
)

Tensor = torch.Tensor


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    """A 1x1 conv with zero weight and bias (key ``<i>.0.{weight,bias}`` as ldm's)."""
    return TimestepEmbedSequential(zero_module(nn.Conv2d(channels, channels, 1, padding=0)))


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch gradient checkpointing of every UNet/ControlNet block inside ``module``."""
    for sub in module.modules():
        if hasattr(sub, "use_checkpoint"):
            sub.use_checkpoint = enabled


class ControlNet(nn.Module):
    """The SD UNet encoder copy of LAControlNet.

    Args:
        in_channels: latent channels of z_t (4).
        hint_channels: channels of the condition latent concatenated to z_t (4).
        model_channels, num_res_blocks, attention_resolutions, channel_mult, dropout,
        conv_resample, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
        resblock_updown, use_new_attention_order, use_spatial_transformer, transformer_depth,
        context_dim, use_linear_in_transformer, legacy: as :class:`~bir.nets.unet.UNetModel`
        (SD 2.1: 320, 2, (4, 2, 1), (1, 2, 4, 4), head channels 64, spatial transformer with
        linear projections, context 1024, legacy False).

    ``forward(x, hint, timesteps, context)``:
        x: ``[B, 4, h, w]`` noisy latent z_t; hint: ``[B, 4, h, w]`` condition latent (scaled
        VAE latent of the stage-1 output); timesteps: LongTensor ``[B]`` original timesteps;
        context: ``[B, 77, context_dim]`` text tokens. Returns ``len(input_blocks) + 1`` (13 for
        SD) residuals, one per input block in order, then the middle block's.
    """

    #: where released files put the network (bir.nets.checkpoints.net_weights): DiffBIR's
    #: control files and v1 full checkpoints, bir's stage-2 checkpoints
    checkpoint_prefixes = ("control_model.", "model.controlnet.", "controlnet.")

    def __init__(
        self,
        in_channels: int = 4,
        hint_channels: int = 4,
        model_channels: int = 320,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        dropout: float = 0.0,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = 64,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = True,
        transformer_depth: int = 1,
        context_dim: int | None = 1024,
        use_linear_in_transformer: bool = True,
        legacy: bool = False,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        self.in_channels, self.hint_channels = in_channels, hint_channels
        self.model_channels = model_channels
        self.spec = EncoderSpec.from_arguments(locals())
        ted = self.spec.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted)
        )
        self.input_blocks, skip_channels, ch, _ = build_unet_encoder(
            self.spec, in_channels + hint_channels
        )
        self.zero_convs = nn.ModuleList([_zero_conv(c) for c in skip_channels])
        self.middle_block = build_middle_block(self.spec, ch)
        self.middle_block_out = _zero_conv(ch)

    @property
    def num_outputs(self) -> int:
        """Number of residuals returned (13 for SD)."""
        return len(self.zero_convs) + 1

    @classmethod
    def from_unet(
        cls, unet: UNetModel, hint_channels: int = 4, use_checkpoint: bool | None = None
    ) -> ControlNet:
        """A ControlNet initialised from ``unet`` (DiffBIR's ``make_stage2_init_weight``).

        The encoder and middle block copy the UNet's weights; the stem conv's extra
        ``hint_channels`` input channels are zero, and the zero convs are zero, so at
        initialisation every residual is exactly 0 and ControlLDM equals the plain UNet.
        """
        spec = unet.spec
        net = cls(
            in_channels=unet.in_channels,
            hint_channels=hint_channels,
            model_channels=spec.model_channels,
            num_res_blocks=spec.num_res_blocks,
            attention_resolutions=spec.attention_resolutions,
            channel_mult=spec.channel_mult,
            dropout=spec.dropout,
            conv_resample=spec.conv_resample,
            use_checkpoint=spec.use_checkpoint if use_checkpoint is None else use_checkpoint,
            num_heads=spec.num_heads,
            num_head_channels=spec.num_head_channels,
            use_scale_shift_norm=spec.use_scale_shift_norm,
            resblock_updown=spec.resblock_updown,
            use_new_attention_order=spec.use_new_attention_order,
            use_spatial_transformer=spec.use_spatial_transformer,
            transformer_depth=spec.transformer_depth,
            context_dim=spec.context_dim,
            use_linear_in_transformer=spec.use_linear_in_transformer,
            legacy=spec.legacy,
        )
        net.load_from_unet(unet)
        return net

    @torch.no_grad()
    def load_from_unet(self, unet: UNetModel) -> None:
        """Copy ``time_embed``, ``input_blocks`` and ``middle_block`` from ``unet`` (in place)."""
        unet_state = unet.state_dict()
        own = self.state_dict()
        stem = "input_blocks.0.0.weight"
        for key, value in own.items():
            if key.startswith(("zero_convs.", "middle_block_out.")):
                continue
            if key not in unet_state:
                raise KeyError(f"UNet has no parameter {key!r} to initialise the ControlNet from")
            src = unet_state[key]
            if key == stem:
                # [C, 4, 3, 3] -> [C, 4 + hint, 3, 3]: the condition channels start at zero
                value.zero_()
                value[:, : src.shape[1]] = src
            else:
                value.copy_(src)

    def forward(
        self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor | None
    ) -> list[Tensor]:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h = torch.cat([x, hint.to(x.dtype)], dim=1)
        outs = []
        for block, zero_conv in zip(self.input_blocks, self.zero_convs):
            h = block(h, emb, context)
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs

"""ldm's KL autoencoder (the Stable Diffusion VAE), with tiled encode/decode for large images.

Parameter names follow ldm (``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``;
under ``first_stage_model.`` in an SD checkpoint) so the released weights load with
``strict=True`` through :func:`bir.nets.checkpoints.load_net`. Images are in [-1, 1] (the
release's range); latents are multiplied by :attr:`AutoencoderKL.scale_factor` (0.18215) by the
caller before diffusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from bir.nets.ddpm_unet import DecoderLevels, EncoderLevels, MidBlock, group_norm
from bir.random import randn
from bir.tiling import tiled_apply


class Encoder(nn.Module):
    """ldm ``Encoder``: image ``[B, in_channels, H, W]`` -> moments ``[B, 2*z_channels, H/f, W/f]``
    (``z_channels`` if not ``double_z``), ``f = 2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = EncoderLevels(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, dropout, resamp_with_conv
        )
        block_in = self.down.out_channels
        self.mid = MidBlock(block_in, dropout=dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """ldm ``Decoder``: latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]``."""

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout=dropout)
        self.up = DecoderLevels(
            ch,
            ch_mult,
            num_res_blocks,
            attn_resolutions,
            resolution // 2 ** (self.num_resolutions - 1),
            block_in,
            dropout,
            resamp_with_conv,
        )
        self.norm_out = group_norm(self.up.out_channels)
        self.conv_out = nn.Conv2d(self.up.out_channels, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The VAE posterior N(mean, diag(exp(logvar))) from moments ``[B, 2z, h, w]``.

    ``logvar`` is clamped to [-30, 20] as in ldm.
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(
        self, generator: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """``mean + std * noise``; ``generator`` is one generator or one per sample (``bir.random``)."""
        if generator is None or isinstance(generator, torch.Generator):
            noise = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        else:
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {self.mean.shape[0]}")
            noise = randn(self.mean.shape[1:], generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per sample, summed over latent dims: ``[B]``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """ldm ``AutoencoderKL`` (inference part: no loss, no discriminator).

    Args:
        ddconfig: ldm's architecture dict: ``double_z``, ``z_channels``, ``resolution``,
            ``in_channels``, ``out_ch``, ``ch``, ``ch_mult``, ``num_res_blocks``,
            ``attn_resolutions``, ``dropout`` (and optionally ``resamp_with_conv``).
        embed_dim: latent channels after ``quant_conv`` (4 for SD).
        scale_factor: latent scaling used by the diffusion model (SD: 0.18215); stored only.
    """

    #: where released files put the network (bir.nets.checkpoints.net_weights): the SD
    #: checkpoint; stand-alone ldm VAE training checkpoints also hold their loss (LPIPS, GAN)
    checkpoint_prefixes = ("first_stage_model.", "model.vae.", "vae.")
    checkpoint_ignored = ("loss.",)
    checkpoint_what = "Stable Diffusion VAE"
    checkpoint_url = "https://huggingface.co/stabilityai/stable-diffusion-2-1-base"

    def __init__(self, ddconfig: Mapping, embed_dim: int, scale_factor: float = 0.18215):
        super().__init__()
        cfg = dict(ddconfig)
        if not cfg.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z=True (mean and log-variance)")
        common = {
            "ch": cfg["ch"],
            "ch_mult": tuple(cfg["ch_mult"]),
            "num_res_blocks": cfg["num_res_blocks"],
            "attn_resolutions": tuple(cfg.get("attn_resolutions", ())),
            "resolution": cfg["resolution"],
            "z_channels": cfg["z_channels"],
            "dropout": cfg.get("dropout", 0.0),
            "resamp_with_conv": cfg.get("resamp_with_conv", True),
        }
        self.encoder = Encoder(in_channels=cfg["in_channels"], double_z=True, **common)
        self.decoder = Decoder(out_ch=cfg["out_ch"], **common)
        self.quant_conv = nn.Conv2d(2 * cfg["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, cfg["z_channels"], 1)
        self.embed_dim = embed_dim
        self.scale_factor = scale_factor
        self.downsample_factor = 2 ** (len(common["ch_mult"]) - 1)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """``x``: ``[B, 3, H, W]`` in [-1, 1] -> posterior over ``[B, embed_dim, H/f, W/f]``."""
        return DiagonalGaussianDistribution(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: unscaled latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h*f, w*f]`` (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = False) -> torch.Tensor:
        """Reconstruction of ``x`` (mode of the posterior unless ``sample_posterior``)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample_posterior else posterior.mode())

    def encode_tiled(
        self, x: torch.Tensor, tile_size: int = 512, overlap: int = 64
    ) -> DiagonalGaussianDistribution:
        """:meth:`encode` over overlapping ``tile_size`` pixel tiles, moments blended linearly.

        Equal to :meth:`encode` when the image fits one tile. Each tile is normalised on its own
        (GroupNorm statistics are per tile), the usual approximation of tiled VAEs.
        """
        f = self.downsample_factor
        moments = tiled_apply(self._moments, x, tile_size, overlap, Fraction(1, f), weight="ramp")
        return DiagonalGaussianDistribution(moments)

    def decode_tiled(self, z: torch.Tensor, tile_size: int = 64, overlap: int = 8) -> torch.Tensor:
        """:meth:`decode` over overlapping ``tile_size`` latent tiles, blended linearly."""
        f = self.downsample_factor
        return tiled_apply(self.decode, z, tile_size, overlap, f, weight="ramp")

"""ldm's KL autoencoder (the Stable Diffusion VAE), with tiled encode/decode for large images.

Parameter names follow ldm (``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``;
under ``first_stage_model.`` in an SD checkpoint) so the released weights load with
``strict=True`` through :func:`bir.nets.checkpoints.load_net`. Images are in [-1, 1] (the release's range); latents are
multiplied by :attr:`AutoencoderKL.scale_factor` (0.18215) by the caller before diffusion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bir.nets.attention import SpatialSelfAttention
from bir.nets.ddpm_unet import Downsample, ResnetBlock, Upsample, group_norm
from bir.random import randn


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
        in_ch_mult = (1, *ch_mult)
        curr_res, block_in = resolution, ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            for _ in range(num_res_blocks):
                stage.block.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, temb_channels=0)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    stage.attn.append(SpatialSelfAttention(block_in))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, temb_channels=0)
        self.mid.attn_1 = SpatialSelfAttention(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, temb_channels=0)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
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
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, temb_channels=0)
        self.mid.attn_1 = SpatialSelfAttention(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, temb_channels=0)
        up_stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(
                    ResnetBlock(block_in, block_out, dropout=dropout, temb_channels=0)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    stage.attn.append(SpatialSelfAttention(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            up_stages.insert(0, stage)
        self.up = nn.ModuleList(up_stages)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
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


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``[0, size)``; the last tile is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _blend_ramp(length: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D weights: linear ramp of ``ramp`` samples on interior edges, 1 elsewhere (never 0)."""
    w = torch.ones(length)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if not at_start:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if not at_end:
            w[-ramp:] = torch.minimum(w[-ramp:], up.flip(0))
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale_num: int = 1,
    scale_den: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` and blend the outputs linearly.

    ``fn`` maps ``[B, C, h, w]`` to ``[B, C', h * s, w * s]`` with ``s = scale_num / scale_den``
    (1/8 for a VAE encoder, 8 for a decoder). Tiles are ``tile`` input pixels wide and overlap by
    ``overlap``; in the overlaps each output pixel is a weighted mean with weights ramping linearly
    from the tile border, so seams fade instead of jumping. Image edges get full weight.

    Args:
        x: ``[B, C, H, W]``; ``H``, ``W``, ``tile`` and ``overlap`` multiples of ``scale_den``.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    for name, v in (
        ("tile", tile),
        ("overlap", overlap),
        ("height", x.shape[-2]),
        ("width", x.shape[-1]),
    ):
        if v % scale_den:
            raise ValueError(f"{name} {v} must be a multiple of {scale_den}")
    b, _, height, width = x.shape
    stride = tile - overlap
    ys, xs = _tile_starts(height, tile, stride), _tile_starts(width, tile, stride)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)

    def out_len(n: int) -> int:
        return n * scale_num // scale_den

    ramp = out_len(overlap)
    out: torch.Tensor | None = None
    weight = torch.zeros(1, 1, out_len(height), out_len(width), device=x.device, dtype=x.dtype)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, height), min(tile, width)
            piece = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            wy = _blend_ramp(out_len(th), ramp, y0 == 0, y0 + th == height)
            wx = _blend_ramp(out_len(tw), ramp, x0 == 0, x0 + tw == width)
            w = (wy[:, None] * wx[None, :]).to(x.device, x.dtype)[None, None]
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], out_len(height), out_len(width))
            oy, ox = out_len(y0), out_len(x0)
            out[:, :, oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += piece * w
            weight[:, :, oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += w
    assert out is not None
    return out / weight


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
        return DiagonalGaussianDistribution(tiled_map(self._moments, x, tile_size, overlap, 1, f))

    def decode_tiled(self, z: torch.Tensor, tile_size: int = 64, overlap: int = 8) -> torch.Tensor:
        """:meth:`decode` over overlapping ``tile_size`` latent tiles, blended linearly."""
        f = self.downsample_factor
        return tiled_map(self.decode, z, tile_size, overlap, f, 1)

"""SwinIR, as used by DiffBIR for stage 1 (degradation removal).

SwinIR: Image Restoration Using Swin Transformer (Liang et al., 2021, arXiv:2108.10257), in the
variant DiffBIR trains (``diffbir/model/swinir.py``): the input is pixel-unshuffled by 8 before the
first conv, the body runs residual Swin transformer blocks (RSTB) on that 1/8 grid, and three
2x nearest-upsample + conv stages bring the features back to the input resolution.

Parameter *and* persistent-buffer names follow the DiffBIR release so ``general_swinir_v1.ckpt``
loads with ``strict=True``:

- ``layers.i.residual_group.blocks.j.attn.relative_position_index`` is persistent in every block;
- ``layers.i.residual_group.blocks.j.attn_mask`` is persistent in the *shifted* blocks (odd j)
  only, computed for the ``img_size // patch_size`` feature grid; unshifted blocks register
  ``None`` so the key is absent;
- the RGB mean is not in the state dict.

Deviations from the reference (none change the weights or the output on 64-multiple inputs):
attention runs through ``F.scaled_dot_product_attention`` with the relative position bias and
the shift mask as an additive ``attn_mask``; inputs are padded to a multiple of
``window_size * unshuffle_scale`` (the reference pads to ``window_size`` only, which fails on the
unshuffled grid unless the caller padded to 64 first) and the output is cropped back to the input
size (the reference returns the padded size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple, trunc_normal_
from torch import nn

#: where DiffBIR publishes the stage-1 weights (named in the error when the file is missing)
DIFFBIR_SWINIR_URL = "https://huggingface.co/lxq007/DiffBIR/resolve/main/general_swinir_v1.ckpt"

#: mean RGB of DIV2K subtracted at the input (SwinIR / DiffBIR constant)
RGB_MEAN = (0.4488, 0.4371, 0.4040)

#: additive bias that blocks attention across shifted-window boundaries (reference value)
MASK_VALUE = -100.0


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> Linear on [..., dim] tokens."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window_size, window_size, C] (windows in row-major order per image)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, ws, ws, C] -> [B, H, W, C]."""
    b = windows.shape[0] // ((h // window_size) * (w // window_size))
    x = windows.reshape(b, h // window_size, w // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """LongTensor[N, N] (N = Wh*Ww): row of the bias table for each (query, key) token pair.

    Swin Transformer eq. (4): the bias B is gathered from a (2Wh-1)(2Ww-1) table indexed by the
    relative offset (dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1).
    """
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(
        1
    )
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shifted_window_mask(h: int, w: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Additive mask [nW, N, N] for SW-MSA: 0 within a region, -100 across regions.

    After the cyclic shift by ``shift_size`` the windows on the bottom/right border hold tokens
    from up to 4 image regions that were not adjacent; tokens may attend only within their region.
    """
    region = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in bands:
        for ws in bands:
            region[:, hs, ws, :] = label
            label += 1
    windows = window_partition(region, window_size).reshape(-1, window_size * window_size)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, MASK_VALUE, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows with a relative position bias.

    ``forward(x [B*nW, N, C], mask [nW, N, N] | None) -> [B*nW, N, C]`` computes
    softmax(Q K^T / sqrt(d) + B_rel + mask) V per head (Swin eq. 4) with
    ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        dim: int,
        window_size: tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        table_size = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        # persistent: the DiffBIR checkpoint stores it, strict loading expects it
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """[heads, N, N] bias gathered from the table."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias().to(q.dtype)  # heads, N, N
        if mask is None:
            attn_bias = bias.unsqueeze(0)  # broadcast over windows and images
        else:
            # Fold the window axis into the head axis, [B, nW*heads, N, d], so the [nW*heads, N, N]
            # bias+mask broadcasts over the batch instead of being copied B times.
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw * heads, n, c // heads) for t in (q, k, v))
            attn_bias = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).reshape(
                1, nw * heads, n, n
            )
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_bias,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.reshape(bw, heads, n, c // heads).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """(S)W-MSA + MLP with pre-norm residuals on tokens [B, H*W, C] of an (H, W) grid."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 8,
        shift_size: int = 0,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            # reference rule: a grid no larger than a window is one unshifted window
            shift_size, window_size = 0, min(self.input_resolution)
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, to_2tuple(window_size), num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        # persistent for shifted blocks (in the released state dict), absent for the others
        mask = (
            shifted_window_mask(*self.input_resolution, window_size, shift_size)
            if shift_size > 0
            else None
        )
        self.register_buffer("attn_mask", mask)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def mask_for(self, x_size: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """The shift mask for an (H, W) grid: the stored buffer at ``input_resolution``, else cached."""
        if self.shift_size == 0:
            return None
        if tuple(x_size) == self.input_resolution:
            return self.attn_mask
        key = (*x_size, str(device))
        if key not in self._mask_cache:
            mask = shifted_window_mask(*x_size, self.window_size, self.shift_size)
            self._mask_cache[key] = mask.to(device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift_size > 0:  # cyclic shift (Swin Sec. 3.2)
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).reshape(-1, self.window_size**2, c)
        windows = self.attn(windows, mask=self.mask_for(x_size, x.device))
        x = window_reverse(
            windows.reshape(-1, self.window_size, self.window_size, c), self.window_size, h, w
        )
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks alternating W-MSA and SW-MSA (shift = window // 2 on odd blocks)."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, x_size)
        return x


def _residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing each RSTB and the body: "1conv" (3x3) or "3conv" (bottleneck)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {kind!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: x + conv(blocks(x)) on tokens [B, H*W, C]."""

    def __init__(self, dim: int, resi_connection: str, **layer_kwargs):
        super().__init__()
        self.residual_group = BasicLayer(dim=dim, **layer_kwargs)
        self.conv = _residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        y = self.residual_group(x, x_size)
        y = self.conv(tokens_to_image(y, x_size))
        return image_to_tokens(y) + x


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_image(x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *x_size)


class PatchEmbed(nn.Module):
    """Feature map to tokens (patch_size 1), with the LayerNorm the release calls ``patch_embed.norm``."""

    def __init__(self, dim: int, patch_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(image_to_tokens(x))


class SwinIR(nn.Module):
    """SwinIR with DiffBIR's pixel-unshuffle input and nearest+conv reconstruction.

    ``forward(x: Tensor[B, in_chans, H, W] in [0, 1]) -> Tensor[B, in_chans, H*s, W*s]`` where
    ``s = 1`` with ``unshuffle`` (DiffBIR: restoration at the input size) and ``s = sf`` without.
    Any H, W: the input is reflect-padded to a multiple of :attr:`pad_multiple` and the output
    cropped back. The output is not clamped (approximately [0, 1]; clamp for display).

    Args:
        img_size: side of the *feature grid* the shift masks are stored for (DiffBIR: 64, i.e.
            512 px crops / 8); other sizes work, their masks are computed on the fly.
        patch_size: token patch size; only 1 is supported (as in every SwinIR release).
        in_chans: image channels (3 for RGB).
        embed_dim: transformer width.
        depths: Swin blocks per RSTB.
        num_heads: attention heads per RSTB.
        window_size: attention window side on the feature grid.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: learnable bias on q, k, v.
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
        sf: upsampling factor of the reconstruction head (2, 4 or 8).
        img_range: the normalised input is multiplied by this (1.0 or 255.0).
        upsampler: only "nearest+conv" (DiffBIR / real-world SwinIR).
        resi_connection: "1conv" or "3conv".
        unshuffle: pixel-unshuffle the input by ``unshuffle_scale`` before the first conv.
        unshuffle_scale: the unshuffle factor; must equal ``sf`` so the output keeps the input size.
        patch_norm: LayerNorm after the patch embedding.
        num_feat: width of the reconstruction head (64 in the reference, where it is a
            constant; smaller only for tiny test models).

    Weights: :func:`bir.nets.checkpoints.load_net` reads DiffBIR's bare
    ``general_swinir_v1.ckpt``, a DiffBIR v1 full checkpoint (under ``preprocess_model.``) and
    bir's stage-1 checkpoints.
    """

    #: where released files put the network (bir.nets.checkpoints.net_weights)
    checkpoint_prefixes = ("preprocess_model.",)
    checkpoint_what = "DiffBIR stage-1 SwinIR"
    checkpoint_url = DIFFBIR_SWINIR_URL

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        sf: int = 8,
        img_range: float = 1.0,
        upsampler: str = "nearest+conv",
        resi_connection: str = "1conv",
        unshuffle: bool = True,
        unshuffle_scale: int | None = 8,
        patch_norm: bool = True,
        num_feat: int = 64,
    ):
        super().__init__()
        if patch_size != 1:
            raise ValueError("only patch_size=1 is supported")
        if upsampler != "nearest+conv":
            raise ValueError(f"only upsampler='nearest+conv' is supported, got {upsampler!r}")
        if sf not in (2, 4, 8):
            raise ValueError(f"sf must be 2, 4 or 8 for nearest+conv, got {sf}")
        if unshuffle and unshuffle_scale != sf:
            # the reference unshuffles by sf but sizes conv_first by unshuffle_scale
            raise ValueError(f"unshuffle_scale ({unshuffle_scale}) must equal sf ({sf})")
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        self.img_range, self.window_size, self.upscale = img_range, window_size, sf
        self.unshuffle, self.unshuffle_scale = unshuffle, unshuffle_scale if unshuffle else 1
        self.scale = 1 if unshuffle else sf
        mean = RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)

        # 1. shallow features
        num_in_ch = in_chans * self.unshuffle_scale**2
        first = nn.Conv2d(num_in_ch, embed_dim, 3, 1, 1)
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(sf), first) if unshuffle else first

        # 2. deep features: RSTBs on the feature grid
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        grid = to_2tuple(img_size // patch_size)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(
                RSTB(
                    embed_dim,
                    resi_connection,
                    input_resolution=grid,
                    depth=depth,
                    num_heads=heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[start : start + depth],
                )
            )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi_connection)

        # 3. reconstruction: log2(sf) x (2x nearest + conv + LeakyReLU(0.2))
        # index 1 is the reference's LeakyReLU with the default slope 0.01
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if sf >= 4:
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if sf == 8:
            self.conv_up3 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def pad_multiple(self) -> int:
        """Input sides are padded to a multiple of this (window_size * unshuffle_scale)."""
        return self.window_size * self.unshuffle_scale

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right by reflection (replicate where the image is too small to reflect)."""
        h, w = x.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] features -> [B, C, h, w] after the RSTBs and the final norm."""
        x_size = (x.shape[2], x.shape[3])
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, x_size)
        return tokens_to_image(self.norm(tokens), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.pad_input(x)
        x = (x - self.mean.to(x.dtype)) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        for name in ("conv_up1", "conv_up2", "conv_up3")[: {2: 1, 4: 2, 8: 3}[self.upscale]]:
            x = self.lrelu(getattr(self, name)(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / self.img_range + self.mean.to(x.dtype)
        return x[..., : h * self.scale, : w * self.scale]

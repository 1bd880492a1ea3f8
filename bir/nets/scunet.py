"""SCUNet: DiffBIR v2's stage 1 for blind denoising.

SCUNet: "Practical Blind Image Denoising via Swin-Conv-UNet and Data Synthesis" (Zhang et al.,
2022, arXiv:2203.13278; Machine Intelligence Research 2023). DiffBIR v2 uses the authors' released
``scunet_color_real_psnr.pth`` (KAIR releases) through ``diffbir/model/scunet.py`` with
``configs/inference/scunet.yaml`` (in_nc 3, config [4, 4, 4, 4, 4, 4, 4], dim 64; head_dim 32,
window 8 and input_resolution 256 are the class's defaults).

Architecture. A three-level UNet whose every block is a Swin-Conv block (:class:`ConvTransBlock`):

    x1 = m_head(x)                       3x3, in_nc -> dim
    x2 = m_down1(x1)                     c0 blocks at dim,   then 2x2 stride-2 conv -> 2 dim
    x3 = m_down2(x2)                     c1 blocks at 2 dim, then 2x2 stride-2 conv -> 4 dim
    x4 = m_down3(x3)                     c2 blocks at 4 dim, then 2x2 stride-2 conv -> 8 dim
    y  = m_body(x4)                      c3 blocks at 8 dim
    y  = m_up3(y + x4)                   2x2 stride-2 transposed conv -> 4 dim, then c4 blocks
    y  = m_up2(y + x3)                   ... -> 2 dim, c5 blocks
    y  = m_up1(y + x2)                   ... -> dim,   c6 blocks
    out = m_tail(y + x1)                 3x3, dim -> in_nc

(convs without bias; ``c`` = ``config``). A Swin-Conv block on C channels splits a 1x1 conv of
its input into a conv half and a transformer half (C/2 each):

    a, b = split(conv1_1(x))
    a = a + conv_block(a)                3x3 conv, ReLU, 3x3 conv (no bias)
    b = b + W-MSA(LN(b)); b = b + MLP(LN(b))   (window attention, MLP 4x with GELU)
    x = x + conv1_2(cat(a, b))

Attention is over non-overlapping ``window_size`` windows with ``C/2 / head_dim`` heads and a
learned relative position bias ``relative_position_params[head, dy + w - 1, dx + w - 1]``; odd
blocks of each stage shift the windows by ``window_size // 2`` (cyclic roll) and mask attention
between pixels that the roll brought together. As released, whether a stage shifts depends on
the constructor's ``input_resolution`` (nominal, 256), not on the actual input: a stage whose
nominal side ``input_resolution / 2^level`` is at most ``window_size`` never shifts.

Parameter names follow the release (``m_head``, ``m_down1..3``, ``m_body``, ``m_up3..1``,
``m_tail``; inside a block ``conv1_1``, ``conv1_2``, ``conv_block.{0,2}``, ``trans_block.ln1``,
``.msa.embedding_layer``, ``.msa.relative_position_params``, ``.msa.linear``, ``.ln2``,
``.mlp.{0,2}``), so the released file loads with ``strict=True``; there are no buffers in the
state dict.

Any input size: as released, the input is replicate-padded at the bottom/right to a multiple of
``8 * window_size`` (three halvings, then whole windows) and the output cropped back. Deviation
(same output to float32 round-off): attention runs through ``F.scaled_dot_product_attention``
with the bias and the ``-inf`` shift mask as one additive mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

#: where SCUNet's authors publish the weights DiffBIR v2 uses (named when the file is missing)
SCUNET_URL = "https://github.com/cszn/KAIR/releases/download/v1.0/scunet_color_real_psnr.pth"


def relative_position_index(window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices into the ``[2w-1, 2w-1]`` bias table, each ``[w*w, w*w]``.

    Pixels of a window are numbered row-major, ``p = i * w + j``; the bias of query ``p`` and key
    ``q`` is ``table[i_p - i_q + w - 1, j_p - j_q + w - 1]``.
    """
    coords = torch.arange(window_size)
    i = coords.repeat_interleave(window_size)
    j = coords.repeat(window_size)
    return i[:, None] - i[None, :] + window_size - 1, j[:, None] - j[None, :] + window_size - 1


def shifted_window_mask(h_windows: int, w_windows: int, window_size: int) -> torch.Tensor:
    """Boolean ``[h_windows * w_windows, w*w, w*w]``: True where attention is blocked.

    After rolling the image by ``-w/2``, the last window row (and column) holds pixels from the
    image's top (left) edge next to pixels from its bottom (right) edge. Within those windows a
    query may attend only to keys on its own side of the seam, which sits at ``w - w/2``.
    """
    w, s = window_size, window_size - window_size // 2
    side = torch.arange(w) >= s  # which side of the seam a window row / column is on
    rows = side.repeat_interleave(w)  # per pixel p = i * w + j: side of its row
    cols = side.repeat(w)
    cross_rows = rows[:, None] != rows[None, :]
    cross_cols = cols[:, None] != cols[None, :]
    mask = torch.zeros(h_windows, w_windows, w * w, w * w, dtype=torch.bool)
    mask[-1, :] |= cross_rows
    mask[:, -1] |= cross_cols
    return mask.reshape(h_windows * w_windows, w * w, w * w)


class WMSA(nn.Module):
    """(Shifted) window multi-head self-attention on ``[B, H, W, C]`` tokens.

    Args:
        input_dim: channels C of the tokens.
        output_dim: channels after the output projection.
        head_dim: channels per head (heads = input_dim // head_dim).
        window_size: window side w; H and W must be multiples of it.
        shifted: roll the windows by w // 2 and mask across the seam ("SW" in the release).
    """

    def __init__(
        self, input_dim: int, output_dim: int, head_dim: int, window_size: int, shifted: bool
    ):
        super().__init__()
        if input_dim % head_dim:
            raise ValueError(f"SCUNet width {input_dim} is not a multiple of head_dim {head_dim}")
        self.head_dim, self.window_size, self.shifted = head_dim, window_size, shifted
        self.n_heads = input_dim // head_dim
        self.embedding_layer = nn.Linear(input_dim, 3 * input_dim)
        self.relative_position_params = nn.Parameter(
            torch.zeros(self.n_heads, 2 * window_size - 1, 2 * window_size - 1)
        )
        trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(input_dim, output_dim)
        rows, cols = relative_position_index(window_size)
        self.register_buffer("index_rows", rows, persistent=False)
        self.register_buffer("index_cols", cols, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """``[heads, w*w, w*w]`` bias added to the attention logits."""
        return self.relative_position_params[:, self.index_rows, self.index_cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        p, half = self.window_size, self.window_size // 2
        if self.shifted:
            x = torch.roll(x, shifts=(-half, -half), dims=(1, 2))
        nh, nw = h // p, w // p
        # windows: [B, nh*nw, p*p, C], pixels row-major within a window
        x = x.reshape(b, nh, p, nw, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * nw, p * p, c)
        # q, k, v each [B, heads, windows, p*p, head_dim]; channels are (3, heads, head_dim)
        qkv = self.embedding_layer(x).reshape(b, nh * nw, p * p, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        bias = self.relative_position_bias()[:, None].to(x.dtype)  # [heads, 1, p*p, p*p]
        if self.shifted:
            blocked = shifted_window_mask(nh, nw, p).to(x.device)
            bias = bias.masked_fill(blocked, float("-inf"))  # [heads, windows, p*p, p*p]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, nh * nw, p * p, c)
        out = self.linear(out)
        out = out.reshape(b, nh, nw, p, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
        if self.shifted:
            out = torch.roll(out, shifts=(half, half), dims=(1, 2))
        return out


class Block(nn.Module):
    """Swin transformer block on ``[B, H, W, C]``: pre-norm (S)W-MSA and a 4x GELU MLP."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        head_dim: int,
        window_size: int,
        drop_path: float,
        shifted: bool,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(input_dim)
        self.msa = WMSA(input_dim, input_dim, head_dim, window_size, shifted)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ln2 = nn.LayerNorm(input_dim)
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, 4 * input_dim), nn.GELU(), nn.Linear(4 * input_dim, output_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.msa(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class ConvTransBlock(nn.Module):
    """Swin-Conv block on ``[B, conv_dim + trans_dim, H, W]`` (see the module docstring)."""

    def __init__(
        self,
        conv_dim: int,
        trans_dim: int,
        head_dim: int,
        window_size: int,
        drop_path: float,
        shifted: bool,
    ):
        super().__init__()
        self.conv_dim, self.trans_dim = conv_dim, trans_dim
        dim = conv_dim + trans_dim
        self.trans_block = Block(trans_dim, trans_dim, head_dim, window_size, drop_path, shifted)
        self.conv1_1 = nn.Conv2d(dim, dim, 1, 1, 0)
        self.conv1_2 = nn.Conv2d(dim, dim, 1, 1, 0)
        self.conv_block = nn.Sequential(
            nn.Conv2d(conv_dim, conv_dim, 3, 1, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(conv_dim, conv_dim, 3, 1, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_x, trans_x = torch.split(self.conv1_1(x), (self.conv_dim, self.trans_dim), dim=1)
        conv_x = conv_x + self.conv_block(conv_x)
        trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))


class SCUNet(nn.Module):
    """Swin-Conv-UNet; with ``config=[4]*7, dim=64`` the released ``scunet_color_real_psnr``.

    ``forward(x: Tensor[B, in_nc, H, W] in [0, 1]) -> Tensor[B, in_nc, H, W]``, nominally in
    [0, 1] but not clamped (DiffBIR v2 feeds the raw output to the VAE; clamp for display). Any
    H, W: replicate-padded to a multiple of :attr:`pad_multiple` and cropped back, as released.

    Args:
        in_nc: image channels (input and output).
        config: Swin-Conv blocks per stage: down1, down2, down3, body, up3, up2, up1.
        dim: width of the first level (levels are dim, 2 dim, 4 dim, body 8 dim); each block's
            transformer half is half the level's width.
        drop_path_rate: stochastic depth, linear over all blocks from 0 to this value.
        input_resolution: nominal input side; only decides which stages shift their windows
            (a stage whose nominal side ``input_resolution / 2^level <= window_size`` never
            does). The release's default 256 makes every stage shift at DiffBIR's sizes.
        head_dim: channels per attention head (32, a constant in the release).
        window_size: attention window side (8, a constant in the release).

    Weights: :func:`bir.nets.checkpoints.load_net` reads the bare ``scunet_color_real_psnr.pth``
    and bir's checkpoints.
    """

    checkpoint_what = "SCUNet"
    checkpoint_url = SCUNET_URL

    def __init__(
        self,
        in_nc: int = 3,
        config: Sequence[int] = (4, 4, 4, 4, 4, 4, 4),
        dim: int = 64,
        drop_path_rate: float = 0.0,
        input_resolution: int = 256,
        head_dim: int = 32,
        window_size: int = 8,
    ):
        super().__init__()
        if len(config) != 7:
            raise ValueError(f"SCUNet config needs 7 stage depths, got {list(config)}")
        if dim % 2:
            raise ValueError(f"SCUNet dim must be even (conv and transformer halves), got {dim}")
        self.window_size = window_size
        # on the CPU even under a meta-device context (the rates are read as Python floats)
        dpr = torch.linspace(0, drop_path_rate, sum(config), device="cpu").tolist()
        starts = [sum(config[:i]) for i in range(7)]

        def blocks(stage: int, width: int, level: int) -> list[nn.Module]:
            # even blocks plain windows, odd blocks shifted, unless the nominal grid is one window
            may_shift = input_resolution // 2**level > window_size
            return [
                ConvTransBlock(
                    width // 2,
                    width // 2,
                    head_dim,
                    window_size,
                    dpr[starts[stage] + i],
                    shifted=bool(i % 2) and may_shift,
                )
                for i in range(config[stage])
            ]

        def down(c: int) -> nn.Module:
            return nn.Conv2d(c, 2 * c, 2, 2, 0, bias=False)

        def up(c: int) -> nn.Module:
            return nn.ConvTranspose2d(2 * c, c, 2, 2, 0, bias=False)

        self.m_head = nn.Sequential(nn.Conv2d(in_nc, dim, 3, 1, 1, bias=False))
        self.m_down1 = nn.Sequential(*blocks(0, dim, 0), down(dim))
        self.m_down2 = nn.Sequential(*blocks(1, 2 * dim, 1), down(2 * dim))
        self.m_down3 = nn.Sequential(*blocks(2, 4 * dim, 2), down(4 * dim))
        self.m_body = nn.Sequential(*blocks(3, 8 * dim, 3))
        self.m_up3 = nn.Sequential(up(4 * dim), *blocks(4, 4 * dim, 2))
        self.m_up2 = nn.Sequential(up(2 * dim), *blocks(5, 2 * dim, 1))
        self.m_up1 = nn.Sequential(up(dim), *blocks(6, dim, 0))
        self.m_tail = nn.Sequential(nn.Conv2d(dim, in_nc, 3, 1, 1, bias=False))

    @property
    def pad_multiple(self) -> int:
        """Input sides are padded to a multiple of this (three halvings x window_size)."""
        return 8 * self.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.pad_multiple
        x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="replicate")
        x1 = self.m_head(x)
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        y = self.m_body(x4)
        y = self.m_up3(y + x4)
        y = self.m_up2(y + x3)
        y = self.m_up1(y + x2)
        return self.m_tail(y + x1)[..., :h, :w]

"""Attention building blocks shared by the UNets and the VAE, with the released parameter names.

Two families, kept name-compatible with their releases so official weights load with
``strict=True``:

* ldm's ``SpatialTransformer`` (Stable Diffusion 2.x, ``ldm/modules/attention.py``): GroupNorm,
  ``proj_in``, ``transformer_blocks.N.{norm1, attn1, norm2, attn2, norm3, ff}``, ``proj_out``;
  attention projections ``to_q``/``to_k``/``to_v`` (no bias) and ``to_out.0``.
* guided-diffusion's fused-QKV attention (``qkv`` 1-D conv): :func:`qkv_attention_legacy` (heads
  interleaved as ``[q_h, k_h, v_h]`` per head) and :func:`qkv_attention` (``[q, k, v]`` first).

All attention goes through ``F.scaled_dot_product_attention`` (SDPA); the references compute an
explicit softmax, which SDPA reproduces up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (ldm's output-layer init)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def maybe_checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """Run ``fn(*args)``, with gradient checkpointing when ``enabled`` and gradients are on.

    Uses the non-reentrant implementation (``use_reentrant=False``), which supports keyword-free
    calls with ``None`` arguments and inputs that do not require grad.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def qkv_attention_legacy(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """guided-diffusion ``QKVAttentionLegacy``: per-head interleaved channels.

    Args:
        qkv: ``[B, 3 * H * C, L]``, channel layout ``[q_0, k_0, v_0, q_1, k_1, v_1, ...]`` with
            ``C`` channels per head ``h`` (the layout of the released ADM checkpoints).
        num_heads: ``H``.

    Returns:
        ``[B, H * C, L]``, heads concatenated along channels.
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
    # SDPA wants [..., L, C]; reference: softmax(q^T k / sqrt(C)) applied to v.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, num_heads * ch, length)


def qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """guided-diffusion ``QKVAttention`` (``use_new_attention_order``): q, k, v blocks first.

    Args:
        qkv: ``[B, 3 * H * C, L]``, channel layout ``[q (H*C), k (H*C), v (H*C)]``.
        num_heads: ``H``.

    Returns:
        ``[B, H * C, L]``.
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = (t.reshape(b, num_heads, ch, length).transpose(2, 3) for t in qkv.chunk(3, dim=1))
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, C]
    return out.transpose(2, 3).reshape(b, num_heads * ch, length)


class CrossAttention(nn.Module):
    """ldm ``CrossAttention``: multi-head attention of ``x`` over ``context`` (self if None).

    Args:
        query_dim: channels of ``x``.
        context_dim: channels of ``context``; ``None`` means self-attention (= ``query_dim``).
        heads: number of heads.
        dim_head: channels per head.
        dropout: dropout after the output projection.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, N, query_dim]``; ``context``: ``[B, M, context_dim]`` or None -> ``[B, N, query_dim]``."""
        context = x if context is None else context
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # scale dim_head**-0.5 as in ldm
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): ``a * gelu(g)`` with ``[a, g] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """ldm ``FeedForward`` with GEGLU (``glu=True``, as in SD): keys ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward.

    Args:
        dim: token channels.
        n_heads, d_head: attention heads and channels per head.
        dropout: dropout inside attention outputs and the feed-forward.
        context_dim: channels of the cross-attention context (``None``: attn2 is self-attention).
        disable_self_attn: attn1 attends to the context too (ldm option; False in SD).
        use_checkpoint: gradient checkpointing of the whole block.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout
        )
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, N, dim]``; ``context``: ``[B, M, context_dim]`` or None."""
        return maybe_checkpoint(self._forward, x, context, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """ldm ``SpatialTransformer``: image features as tokens through transformer blocks.

    Args:
        in_channels: feature channels ``C``.
        n_heads, d_head: heads and channels per head (``inner_dim = n_heads * d_head``).
        depth: number of transformer blocks.
        dropout: dropout inside the blocks.
        context_dim: cross-attention context channels (1024 for OpenCLIP ViT-H in SD 2.1).
        disable_self_attn: see :class:`BasicTransformerBlock`.
        use_linear: ``proj_in``/``proj_out`` as Linear on tokens (SD 2.x) instead of 1x1 convs.
        use_checkpoint: gradient checkpointing of each block.

    ``forward(x [B, C, H, W], context [B, M, context_dim] | None) -> [B, C, H, W]`` (residual).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn, use_checkpoint
            )
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv ``q``, ``k``, ``v``, ``proj_out``.

    The ``AttnBlock`` of the DDPM/DDIM UNets and of ldm's VAE (keys ``norm``, ``q``, ``k``, ``v``,
    ``proj_out``; GroupNorm(32, eps=1e-6)). ``forward(x [B, C, H, W]) -> [B, C, H, W]`` (residual).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))

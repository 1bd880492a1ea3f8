"""Overlapping-tile application of an image-to-image function, blended with smooth weights.

Used to run networks on images larger than fit in memory (DiffBIR stage 1 at 512 px tiles with
256 px overlap; stage 2 on latent tiles). For every output pixel the result is the weighted mean
of the tiles covering it, ``sum_t w_t * fn(x_t) / sum_t w_t``, with strictly positive weights, so
the blend is exact for any function that acts pixel by pixel (identity, pointwise maps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, size)`` with at least ``overlap``.

    Tiles are spaced by ``tile - overlap``; the last one is aligned to the end, so every tile lies
    inside the image. A side no larger than ``tile`` gets a single tile at 0.
    """
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def blend_weights(height: int, width: int, kind: str = "gaussian") -> torch.Tensor:
    """Tile weights [height, width], strictly positive, largest at the centre.

    - ``gaussian``: separable exp(-(x - c)^2 / (2 var n^2)) with var = 0.01 in units of the tile
      side, as in DiffBIR's tiled sampler (about 4e-6 of the peak at the border).
    - ``linear``: separable tent, min(i + 1, n - i) per axis.
    """

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        if kind == "gaussian":
            var = 0.01
            return torch.exp(-((i - (n - 1) / 2) ** 2) / (n * n) / (2 * var))
        if kind == "linear":
            return torch.minimum(i + 1, n - i)
        raise ValueError(f"weight must be 'gaussian' or 'linear', got {kind!r}")

    w = axis(height)[:, None] * axis(width)[None, :]
    return (w / w.max()).float()


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: int = 1,
    weight: str = "gaussian",
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` crops of ``x`` and blend the results.

    Args:
        fn: maps [B, C, t, t'] to [B, C_out, t*scale, t'*scale] (any value range).
        x: input [B, C, H, W].
        tile: tile side in input pixels (a side shorter than ``tile`` is one tile).
        overlap: overlap between neighbouring tiles in input pixels, ``0 <= overlap < tile``.
        scale: output/input size ratio of ``fn`` (1 for restoration, 8 for a VAE decoder ...).
        weight: "gaussian" (DiffBIR) or "linear" blending weights.

    Returns:
        [B, C_out, H*scale, W*scale], the weighted mean of the tile outputs per pixel.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    b, _, h, w = x.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out: torch.Tensor | None = None
    total: torch.Tensor | None = None
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for top in rows:
        for left in cols:
            th, tw = min(tile, h), min(tile, w)
            y = fn(x[:, :, top : top + th, left : left + tw])
            if y.shape[-2:] != (th * scale, tw * scale):
                raise ValueError(
                    f"fn returned {tuple(y.shape[-2:])} for a {th}x{tw} tile; expected scale {scale}"
                )
            if out is None:  # accumulate in float32 even for half-precision outputs
                out_dtype = y.dtype
                out = torch.zeros(b, y.shape[1], h * scale, w * scale, device=y.device)
                total = torch.zeros(1, 1, h * scale, w * scale, device=y.device)
            key = (th * scale, tw * scale)
            if key not in weights:
                weights[key] = blend_weights(*key, kind=weight).to(y.device)
            wt = weights[key]
            rs, cs = (
                slice(top * scale, (top + th) * scale),
                slice(left * scale, (left + tw) * scale),
            )
            out[:, :, rs, cs] += y.float() * wt
            total[:, :, rs, cs] += wt
    assert out is not None and total is not None
    return (out / total).to(out_dtype)


def num_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    """How many times :func:`tiled_apply` calls ``fn`` for an image of this size."""
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


__all__ = ["blend_weights", "num_tiles", "tile_starts", "tiled_apply"]

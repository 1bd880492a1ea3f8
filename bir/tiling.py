"""Overlapping tiles: where they go, how they are weighted, cutting an image into them and folding
them back. The one tiling engine of bir:

- :func:`tiled_apply` runs an image-to-image function tile by tile and blends the outputs:
  DiffBIR's stage 1 (512 px tiles, 256 px overlap) and latent-tiled sampling with ``gaussian``
  weights, stage-1 prediction, the VAE's tiled encode/decode with ``ramp`` weights.
- :func:`unfold` / :func:`fold` cut a batch into tiles and average (or sum) them back: the
  BIR-D / GDP patch grid (:mod:`bir.lit.patches`) and its per-patch guidance gradients.

Tiles of side ``tile`` are spaced by ``tile - overlap`` and the last one is moved flush with the
image's end (:func:`tile_starts`), so every tile lies inside the image. For every output pixel the
blend is the weighted mean of the tiles covering it, ``sum_t w_t * fn(x_t) / sum_t w_t``, with
strictly positive weights, so it is exact for any function that acts pixel by pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

#: blending weights of :func:`tiled_apply` (see :func:`blend_weights`)
WEIGHTS = ("gaussian", "linear", "ramp")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, size)`` with at least ``overlap``.

    Tiles are spaced by ``tile - overlap``; the last one is aligned to the end, so every tile lies
    inside the image. A side no larger than ``tile`` gets a single tile at 0.
    """
    if size <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"the overlap {overlap} must be smaller than the tile {tile}")
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``(top, left)`` of every tile, row-major (:func:`tile_starts` along each axis)."""
    return [
        (top, left)
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def num_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    """How many tiles an image of this size has (calls of ``fn`` in :func:`tiled_apply`)."""
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def blend_weights(
    height: int,
    width: int,
    kind: str = "gaussian",
    ramp: int = 0,
    edges: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> torch.Tensor:
    """Tile weights ``[height, width]`` float32, strictly positive.

    - ``gaussian``: separable exp(-(x - c)^2 / (2 var n^2)) with var = 0.01 in units of the tile
      side, as in DiffBIR's tiled sampler (about 4e-6 of the peak at the border); peak 1.
    - ``linear``: separable tent, min(i + 1, n - i) per axis; peak 1.
    - ``ramp``: 1, except a linear ramp ``(i + 0.5) / ramp`` over the ``ramp`` samples next to
      each side that is not an image edge (``edges``: top, bottom, left, right lie on the image
      border); the tiled VAE's weights, so seams fade and the image border keeps full weight.
    """
    if kind == "ramp":
        top, bottom, left, right = edges
        rows = _ramp_axis(height, ramp, top, bottom)
        return rows[:, None] * _ramp_axis(width, ramp, left, right)[None, :]

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        if kind == "gaussian":
            var = 0.01
            return torch.exp(-((i - (n - 1) / 2) ** 2) / (n * n) / (2 * var))
        if kind == "linear":
            return torch.minimum(i + 1, n - i)
        raise ValueError(f"weight must be one of {', '.join(WEIGHTS)}, got {kind!r}")

    w = axis(height)[:, None] * axis(width)[None, :]
    return (w / w.max()).float()


def _ramp_axis(length: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D ``ramp`` weights: rising over ``ramp`` samples at an interior start, falling at an
    interior end, 1 elsewhere (never 0)."""
    w = torch.ones(length)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if not at_start:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if not at_end:
            w[-ramp:] = torch.minimum(w[-ramp:], up.flip(0))
    return w


class _Canvas:
    """Tiles accumulated onto a ``[batch, channels, height, width]`` canvas with their weights.

    ``add`` places a (weighted) tile, :meth:`mean` is the weighted mean per pixel and ``total``
    the plain sum. Accumulates in ``dtype``; differentiable (in-place adds on fresh tensors).
    """

    def __init__(
        self, batch: int, channels: int, height: int, width: int, dtype: torch.dtype, device
    ):
        self.total = torch.zeros(batch, channels, height, width, dtype=dtype, device=device)
        self.weight = torch.zeros(1, 1, height, width, dtype=dtype, device=device)

    def add(self, tile: torch.Tensor, top: int, left: int, weight: torch.Tensor | None = None):
        """Add ``tile`` ``[batch, channels, h, w]`` at ``(top, left)``, times ``weight``
        ``[h, w]`` (None: 1, every covering tile counts the same)."""
        win = (..., slice(top, top + tile.shape[-2]), slice(left, left + tile.shape[-1]))
        tile = tile.to(self.total.dtype)
        if weight is None:
            self.total[win] += tile
            self.weight[win] += 1
        else:
            self.total[win] += tile * weight
            self.weight[win] += weight

    def mean(self) -> torch.Tensor:
        """The weighted mean of the tiles covering each pixel."""
        return self.total / self.weight


def unfold(x: torch.Tensor, positions: Sequence[tuple[int, int]], height: int, width: int):
    """Cut ``x`` ``[B, C, H, W]`` into the ``height x width`` tiles at ``positions``:
    ``[B * N, C, height, width]``, image ``b``'s tiles in rows ``b * N ... (b + 1) * N - 1`` in
    the order of ``positions``. Differentiable (plain slicing)."""
    b, c = x.shape[:2]
    tiles = [x[:, :, top : top + height, left : left + width] for top, left in positions]
    return torch.stack(tiles, dim=1).reshape(b * len(tiles), c, height, width)


def fold(
    tiles: torch.Tensor,
    positions: Sequence[tuple[int, int]],
    height: int,
    width: int,
    average: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inverse of :func:`unfold`: tiles ``[B * N, C, h, w]`` back into ``[B, C, height, width]``,
    every pixel the mean (``average``) or the sum of the tiles covering it.

    Sums run in ``dtype`` (None: the tiles' own), the result has the tiles' dtype. Differentiable.
    """
    n = len(positions)
    if tiles.shape[0] % n:
        raise ValueError(f"{tiles.shape[0]} tiles is not a multiple of {n} tiles per image")
    per_image = tiles.reshape(-1, n, *tiles.shape[1:])
    canvas = _Canvas(
        per_image.shape[0], tiles.shape[1], height, width, dtype or tiles.dtype, tiles.device
    )
    for k, (top, left) in enumerate(positions):
        canvas.add(per_image[:, k], top, left)
    return (canvas.mean() if average else canvas.total).to(tiles.dtype)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: int | Fraction = 1,
    weight: str = "gaussian",
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` crops of ``x`` and blend the results.

    Args:
        fn: maps [B, C, t, t'] to [B, C_out, t*scale, t'*scale] (any value range).
        x: input [B, C, H, W].
        tile: tile side in input pixels (a side shorter than ``tile`` is one tile).
        overlap: overlap between neighbouring tiles in input pixels, ``0 <= overlap < tile``.
        scale: output/input size ratio of ``fn``: 1 for restoration, 8 for a VAE decoder,
            ``Fraction(1, 8)`` for its encoder (then ``tile``, ``overlap``, H and W must be
            multiples of 8).
        weight: ``gaussian`` (DiffBIR), ``linear`` or ``ramp`` (the tiled VAE, ramps over the
            overlap) blending weights (:func:`blend_weights`).

    Returns:
        [B, C_out, H*scale, W*scale], the weighted mean of the tile outputs per pixel (``fn(x)``
        itself when ``x`` is one tile), accumulated in at least float32.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {', '.join(WEIGHTS)}, got {weight!r}")
    scale = Fraction(scale)
    b, _, h, w = x.shape
    for name, v in (("tile", tile), ("overlap", overlap), ("height", h), ("width", w)):
        if (v * scale).denominator != 1:
            raise ValueError(
                f"{name} {v} must be a multiple of {scale.denominator} for an output {scale} "
                "times the input"
            )

    def out_len(n: int) -> int:
        return int(n * scale)

    def apply(crop: torch.Tensor) -> torch.Tensor:
        y = fn(crop)
        th, tw = crop.shape[-2:]
        if y.shape[-2:] != (out_len(th), out_len(tw)):
            raise ValueError(
                f"fn returned {tuple(y.shape[-2:])} for a {th}x{tw} tile; expected scale {scale}"
            )
        return y

    th, tw = min(tile, h), min(tile, w)
    positions = tile_grid(h, w, tile, overlap)
    if len(positions) == 1:
        return apply(x)
    canvas: _Canvas | None = None
    weights: dict[tuple[int, ...], torch.Tensor] = {}
    for top, left in positions:
        y = apply(x[:, :, top : top + th, left : left + tw])
        if canvas is None:  # accumulate in float32 even for half-precision outputs
            acc = torch.promote_types(y.dtype, torch.float32)
            canvas = _Canvas(b, y.shape[1], out_len(h), out_len(w), acc, y.device)
        edges = (top == 0, top + th == h, left == 0, left + tw == w)
        key = (*y.shape[-2:], *edges) if weight == "ramp" else tuple(y.shape[-2:])
        if key not in weights:
            wt = blend_weights(*y.shape[-2:], kind=weight, ramp=out_len(overlap), edges=edges)
            weights[key] = wt.to(y.device, canvas.total.dtype)
        canvas.add(y, out_len(top), out_len(left), weights[key])
    assert canvas is not None
    return canvas.mean().to(y.dtype)


__all__ = [
    "WEIGHTS",
    "blend_weights",
    "fold",
    "num_tiles",
    "tile_grid",
    "tile_starts",
    "tiled_apply",
    "unfold",
]

"""The overlapping-tile engine (bir.tiling): positions, weights, blending, fold/unfold."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from bir.lit.patches import fold_patches, patch_positions
from bir.tiling import (
    blend_weights,
    fold,
    num_tiles,
    tile_grid,
    tile_starts,
    tiled_apply,
    unfold,
)


def test_tile_starts_cover_the_image():
    assert tile_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert tile_starts(32, 32, 16) == [0]
    assert tile_starts(20, 32, 16) == [0]  # smaller than a tile: one (smaller) tile
    for size in range(33, 120, 7):
        starts = tile_starts(size, 32, 8)
        assert starts[-1] + 32 == size
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(0 < g <= 24 for g in gaps)  # consecutive tiles overlap by >= 8


@pytest.mark.parametrize("weight", ["gaussian", "linear"])
@pytest.mark.parametrize("shape", [(50, 70), (32, 32), (20, 45)])
def test_identity_and_pointwise_are_exact(weight, shape):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *shape)
    torch.testing.assert_close(tiled_apply(lambda t: t, x, 16, 8, weight=weight), x)
    f = lambda t: torch.sin(3 * t) + t**2  # noqa: E731
    torch.testing.assert_close(tiled_apply(f, x, 16, 6, weight=weight), f(x))


def test_scaled_output_matches_global_nearest_upsampling():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 28)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    out = tiled_apply(up, x, 16, 4, scale=2)
    assert out.shape == (1, 3, 80, 56)
    torch.testing.assert_close(out, up(x))


def test_blend_is_a_weighted_mean_of_tiles():
    """fn returns a per-tile constant: pixels inside one tile only take that constant, pixels in
    an overlap a convex combination of the tiles covering them."""
    calls = []

    def const(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return torch.full_like(t, float(len(calls)))

    x = torch.zeros(1, 1, 16, 40)
    out = tiled_apply(const, x, 16, 8, weight="linear")
    assert len(calls) == num_tiles(16, 40, 16, 8) == 4  # column starts 0, 8, 16, 24
    assert torch.allclose(out[..., :, :8], torch.ones(1))  # only tile 1 covers columns 0-7
    assert torch.allclose(out[..., :, 32:], torch.full((1,), 4.0))  # only tile 4
    # columns 8-15 are covered by tiles 1 and 2 with linear weights: value strictly in between
    mid = out[0, 0, 0, 8:16]
    assert ((mid > 1) & (mid < 2)).all() and (mid.diff() > 0).all()


def test_linear_and_gaussian_weights():
    w = blend_weights(1, 4, "linear")
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 1.0, 0.5]]))
    g = blend_weights(9, 9, "gaussian")
    assert (g > 0).all() and g[4, 4] == 1.0
    # var 0.01 in tile units: the border (distance 4 of 9) sits at exp(-(4/9)^2 / 0.02)
    assert g[4, 0].item() == pytest.approx(
        torch.exp(torch.tensor(-((4 / 9) ** 2) / 0.02)).item(), rel=1e-5
    )


def test_rejects_bad_overlap_and_wrong_scale():
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="overlap"):
        tiled_apply(lambda t: t, x, 16, 16)
    with pytest.raises(ValueError, match="scale"):
        tiled_apply(lambda t: t, x, 16, 8, scale=2)


def test_half_precision_output_keeps_dtype():
    x = torch.rand(1, 3, 40, 40).to(torch.bfloat16)
    out = tiled_apply(lambda t: t, x, 16, 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x)


# --- the engine against the tilers it replaced (their code as it was, kept here as references) ---
def _former_starts(size: int, tile: int, stride: int) -> list[int]:
    """The VAE tiler's ``_tile_starts`` and the patch grid's ``patch_positions``."""
    if size <= tile:
        return [0]
    positions = list(range(0, size - tile + 1, stride))
    if positions[-1] != size - tile:
        positions.append(size - tile)
    return positions


def _former_vae_ramp(length: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    w = torch.ones(length)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if not at_start:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if not at_end:
            w[-ramp:] = torch.minimum(w[-ramp:], up.flip(0))
    return w


def _former_vae_tiled_map(fn, x, tile, overlap, scale_num=1, scale_den=1):
    b, _, height, width = x.shape
    stride = tile - overlap
    ys, xs = _former_starts(height, tile, stride), _former_starts(width, tile, stride)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)

    def out_len(n: int) -> int:
        return n * scale_num // scale_den

    ramp = out_len(overlap)
    out = None
    weight = torch.zeros(1, 1, out_len(height), out_len(width), dtype=x.dtype)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, height), min(tile, width)
            piece = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            wy = _former_vae_ramp(out_len(th), ramp, y0 == 0, y0 + th == height)
            wx = _former_vae_ramp(out_len(tw), ramp, x0 == 0, x0 + tw == width)
            w = (wy[:, None] * wx[None, :]).to(x.dtype)[None, None]
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], out_len(height), out_len(width))
            oy, ox = out_len(y0), out_len(x0)
            out[:, :, oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += piece * w
            weight[:, :, oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += w
    return out / weight


def _former_tiled_apply(fn, x, tile, overlap, scale=1, weight="gaussian"):
    b, _, h, w = x.shape
    rows, cols = _former_starts(h, tile, tile - overlap), _former_starts(w, tile, tile - overlap)
    out = total = None
    for top in rows:
        for left in cols:
            th, tw = min(tile, h), min(tile, w)
            y = fn(x[:, :, top : top + th, left : left + tw])
            if out is None:
                out_dtype = y.dtype
                out = torch.zeros(b, y.shape[1], h * scale, w * scale)
                total = torch.zeros(1, 1, h * scale, w * scale)
            wt = blend_weights(th * scale, tw * scale, kind=weight)
            rs = slice(top * scale, (top + th) * scale)
            cs = slice(left * scale, (left + tw) * scale)
            out[:, :, rs, cs] += y.float() * wt
            total[:, :, rs, cs] += wt
    return (out / total).to(out_dtype)


def _former_fold(tiles, positions, h, w, average=True, dtype=None):
    """BIR-D's ``_fold`` (tiles' dtype) and ``fold_patches`` (float64)."""
    n, p = len(positions), tiles.shape[-1]
    per_image = tiles.reshape(-1, n, *tiles.shape[1:]).to(dtype or tiles.dtype)
    total = per_image.new_zeros(per_image.shape[0], tiles.shape[1], h, w)
    count = per_image.new_zeros(1, 1, h, w)
    for k, (top, left) in enumerate(positions):
        total[..., top : top + p, left : left + p] += per_image[:, k]
        count[..., top : top + p, left : left + p] += 1
    return (total / count if average else total).to(tiles.dtype)


def _nonlocal(t: torch.Tensor) -> torch.Tensor:
    """Output depends on the whole tile (its mean), so the blend weights matter."""
    return torch.sin(3 * t) + t.mean(dim=(-2, -1), keepdim=True)


def test_positions_equal_the_former_tilers():
    for size in (1, 15, 16, 17, 40, 100, 257, 300):
        for tile, overlap in ((16, 0), (16, 8), (16, 15), (32, 12), (256, 128)):
            former = _former_starts(size, tile, tile - overlap)
            assert tile_starts(size, tile, overlap) == former, (size, tile, overlap)
            if size >= tile:  # the patch grid refuses smaller images
                assert patch_positions(size, tile, tile - overlap) == former
    assert tile_grid(40, 24, 16, 8) == [(t, lf) for t in (0, 8, 16, 24) for lf in (0, 8)]


def test_ramp_weights_equal_the_former_vae_tiler():
    for edges in itertools.product((False, True), repeat=4):
        for n, ramp in ((16, 4), (12, 6), (8, 0), (10, 8)):
            top, bottom, left, right = edges
            rows = _former_vae_ramp(n, ramp, top, bottom)
            former = rows[:, None] * _former_vae_ramp(n + 2, ramp, left, right)[None, :]
            engine = blend_weights(n, n + 2, "ramp", ramp=ramp, edges=edges)
            assert torch.equal(engine, former)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_apply_equals_the_former_tilers_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56, dtype=dtype)

    def down(t):
        return F.avg_pool2d(_nonlocal(t), 4)

    def up(t):
        return F.interpolate(_nonlocal(t), scale_factor=2)

    # the VAE's tiler: encoder-like (1/4) and decoder-like (x2) with ramps over the overlap
    ours = tiled_apply(down, x, 16, 8, Fraction(1, 4), weight="ramp")
    assert torch.equal(ours, _former_vae_tiled_map(down, x, 16, 8, scale_den=4))
    ours = tiled_apply(up, x, 16, 4, 2, weight="ramp")
    assert torch.equal(ours, _former_vae_tiled_map(up, x, 16, 4, scale_num=2))
    if dtype == torch.float32:  # the former tiled_apply accumulated in float32 always
        for weight in ("gaussian", "linear"):
            ours = tiled_apply(up, x, 16, 6, 2, weight=weight)
            assert torch.equal(ours, _former_tiled_apply(up, x, 16, 6, 2, weight=weight))


def test_fold_and_unfold_equal_the_former_patch_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 29)
    positions = tile_grid(37, 29, 16, 8)
    tiles = unfold(x, positions, 16, 16)
    assert torch.equal(tiles[len(positions) + 1], x[1, :, 0:16, 8:24])
    noisy = tiles + torch.randn_like(tiles)  # overlaps now disagree
    for average in (True, False):
        assert torch.equal(
            fold(noisy, positions, 37, 29, average=average),
            _former_fold(noisy, positions, 37, 29, average=average),
        )
    former = _former_fold(noisy, positions, 37, 29, dtype=torch.float64)
    assert torch.equal(fold(noisy, positions, 37, 29, dtype=torch.float64), former)
    assert torch.equal(fold_patches(noisy, 37, 29, 16, 8), former)

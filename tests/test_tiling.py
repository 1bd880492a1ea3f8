"""Tiled application with blended overlaps (bir.tiling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bir.tiling import blend_weights, num_tiles, tile_starts, tiled_apply


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

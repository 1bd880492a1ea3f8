"""Overlapping patch grid: positions, exact fold/extract round trip, overlap averaging and the
model wrapper (folded outputs, per-patch clipping, chunked calls)."""

import pytest
import torch

from bir.lit.patches import extract_patches, fold_patches, num_patches, patch_positions


def test_positions_cover_the_image_with_the_last_tile_flush():
    assert patch_positions(256, 256, 128) == [0]
    assert patch_positions(512, 256, 128) == [0, 128, 256]
    assert patch_positions(300, 256, 128) == [0, 44]  # last tile moved to end at 300
    assert patch_positions(40, 16, 8) == [0, 8, 16, 24]
    assert num_patches(300, 512, 256, 128) == 2 * 3
    with pytest.raises(ValueError, match="smaller than the patch"):
        patch_positions(200, 256, 128)


def test_fold_of_extract_is_the_identity_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 52, generator=g)
    patches = extract_patches(x, 16, 8)
    assert patches.shape == (2 * num_patches(40, 52, 16, 8), 3, 16, 16)
    # image 1's first patch is its top-left corner
    assert torch.equal(patches[num_patches(40, 52, 16, 8)], x[1, :, :16, :16])
    assert torch.equal(fold_patches(patches, 40, 52, 16, 8), x)


def test_constant_field_is_exact_and_overlaps_are_averaged():
    x = torch.full((1, 3, 37, 29), 0.1234567)
    assert torch.equal(fold_patches(extract_patches(x, 16, 8), 37, 29, 16, 8), x)
    # 24x24 with 16/8: tiles at (0,0), (0,8), (8,0), (8,8) filled with 0, 1, 2, 3
    tiles = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 16, 16)
    out = fold_patches(tiles, 24, 24, 16, 8)[0, 0]
    assert out[0, 0] == 0 and out[0, 20] == 1 and out[20, 0] == 2 and out[20, 20] == 3
    assert out[12, 12] == 1.5  # covered by all four
    assert out[4, 12] == 0.5  # tiles 0 and 1
    assert out[12, 4] == 1.0  # tiles 0 and 2


def test_fold_is_differentiable():
    x = torch.randn(1, 1, 24, 24, requires_grad=True)
    fold_patches(extract_patches(x, 16, 8), 24, 24, 16, 8).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_patch_grid_model_folds_outputs_and_clips_per_patch():
    from bir.diffusion.parameterization import ModelOutput
    from bir.lit.patches import PatchGridModel

    calls = []

    def pointwise(x, i):  # a per-pixel model: the grid must not change its outputs
        calls.append(x.shape[0])
        return ModelOutput(eps=-x, x0=0.5 * x, log_variance=(x.abs() + 1).log())

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 24, 40, generator=g)
    i = torch.tensor([3, 3])
    out = PatchGridModel(pointwise, 16, 8, batch_size=5)(x, i)
    ref = pointwise(x, i)
    assert torch.allclose(out.x0, ref.x0.clamp(-1, 1), atol=1e-6)
    assert torch.allclose(out.eps, ref.eps, atol=1e-6)
    assert torch.allclose(out.log_variance, ref.log_variance, atol=1e-6)
    n = num_patches(24, 40, 16, 8)
    assert out.patches.x0.shape == (2 * n, 3, 16, 16) and len(out.positions) == n
    assert calls[:-1] == [5, 5, 5, 1] and 2 * n == 16  # chunks of batch_size patches, then ref

    def patch_offset(x, i):  # x0 depends on the whole patch: clipping before averaging matters
        x0 = x + 2 * x.mean(dim=(1, 2, 3), keepdim=True)
        return ModelOutput(eps=x, x0=x0, log_variance=None)

    y = torch.linspace(-1.5, 1.5, 24)[None, None, None].expand(1, 1, 16, 24).contiguous()
    out = PatchGridModel(patch_offset, 16, 8)(y, torch.tensor([0]))
    tiles = extract_patches(y, 16, 8)
    expected = fold_patches(patch_offset(tiles, None).x0.clamp(-1, 1), 16, 24, 16, 8)
    assert torch.allclose(out.x0, expected) and out.log_variance is None
    unclipped = fold_patches(patch_offset(tiles, None).x0, 16, 24, 16, 8).clamp(-1, 1)
    assert not torch.allclose(out.x0, unclipped)

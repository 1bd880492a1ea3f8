"""Overlapping patch grid: positions, exact fold/extract round trip and overlap averaging."""

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

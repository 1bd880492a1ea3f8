"""Overlapping patch grid for running a fixed-size diffusion prior on images of any size.

BIR-D (and GDP) restore images larger than the prior's training resolution by splitting them into
``patch`` x ``patch`` tiles on a grid of stride ``stride`` (256 / 128 in the papers), running the
prior on every tile and averaging the tiles' predictions where they overlap. The last tile of each
row / column is moved flush with the image border, so every pixel is covered whatever the size.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """Top (or left) offsets of the tiles along one axis of length ``size``.

    Offsets are ``0, stride, 2*stride, ...`` and the last tile ends exactly at ``size``.
    Raises ValueError when the image is smaller than one tile or the stride is not positive.
    """
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if size < patch:
        raise ValueError(f"image side {size} is smaller than the patch size {patch}")
    positions = list(range(0, size - patch + 1, stride))
    if positions[-1] != size - patch:
        positions.append(size - patch)
    return positions


def grid(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every tile, row-major."""
    return [
        (top, left)
        for top in patch_positions(height, patch, stride)
        for left in patch_positions(width, patch, stride)
    ]


def num_patches(height: int, width: int, patch: int, stride: int) -> int:
    """Number of tiles per image."""
    return len(grid(height, width, patch, stride))


def extract_patches(x: Tensor, patch: int, stride: int) -> Tensor:
    """Cut ``x`` ([B, C, H, W]) into tiles: ``[B * N, C, patch, patch]``.

    Tiles of image ``b`` occupy rows ``b * N ... (b + 1) * N - 1`` in row-major grid order, so
    per-image quantities repeat with ``repeat_interleave(N)``. Differentiable (plain slicing).
    """
    b, c, h, w = x.shape
    tiles = [
        x[:, :, top : top + patch, left : left + patch] for top, left in grid(h, w, patch, stride)
    ]
    return torch.stack(tiles, dim=1).reshape(b * len(tiles), c, patch, patch)


def fold_patches(patches: Tensor, height: int, width: int, patch: int, stride: int) -> Tensor:
    """Inverse of :func:`extract_patches`: average the tiles back into ``[B, C, height, width]``.

    Every pixel is the mean of the tiles that cover it. The sums are accumulated in float64, so
    a constant field and ``fold_patches(extract_patches(x))`` come back exactly (up to 9 overlaps
    of float32 values add without rounding). Differentiable.
    """
    positions = grid(height, width, patch, stride)
    n = len(positions)
    if patches.shape[0] % n:
        raise ValueError(f"{patches.shape[0]} patches is not a multiple of {n} patches per image")
    b, c = patches.shape[0] // n, patches.shape[1]
    tiles = patches.reshape(b, n, c, patch, patch).to(torch.float64)
    total = patches.new_zeros((b, c, height, width), dtype=torch.float64)
    count = patches.new_zeros((1, 1, height, width), dtype=torch.float64)
    for k, (top, left) in enumerate(positions):
        total[:, :, top : top + patch, left : left + patch] += tiles[:, k]
        count[:, :, top : top + patch, left : left + patch] += 1
    return (total / count).to(patches.dtype)

"""Overlapping patch grid for running a fixed-size diffusion prior on images of any size.

BIR-D (and GDP) restore images larger than the prior's training resolution by splitting them into
``patch`` x ``patch`` tiles on a grid of stride ``stride`` (256 / 128 in the papers), running the
prior on every tile and averaging the tiles' predictions where they overlap. The last tile of each
row / column is moved flush with the image border, so every pixel is covered whatever the size.

:class:`PatchGridModel` is that grid as a model wrapper: ``(x_t, i) -> ModelOutput`` for an
image of any size, so a sampler never sees the patches. The released GDP / BIR-D samplers
(``p_sample`` with ``overlapping_grid_indices``) average the per-patch posterior means and
log-variances; since the posterior mean is linear in x0 for a fixed x_t, averaging the per-patch
(clipped) x0 and computing one mean is the same thing.

Difference from the released grid: its position lists always append the last tile, so a side of
exactly one patch gets the tile twice (a 256 image is 4 identical corners, a 384 side 0, 128,
128). Averaging identical tiles changes nothing for the network's outputs; here each position is
used once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from bir.diffusion.parameterization import ModelOutput
from bir.tiling import fold, tile_grid, tile_starts, unfold

Tensor = torch.Tensor


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """Top (or left) offsets of the tiles along one axis of length ``size``.

    Offsets are ``0, stride, 2*stride, ...`` and the last tile ends exactly at ``size``
    (:func:`bir.tiling.tile_starts` with overlap ``patch - stride``). Raises ValueError when the
    image is smaller than one tile or the stride is not positive.
    """
    _check(size, size, patch, stride)
    return tile_starts(size, patch, patch - stride)


def grid(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every tile, row-major."""
    _check(height, width, patch, stride)
    return tile_grid(height, width, patch, patch - stride)


def _check(height: int, width: int, patch: int, stride: int) -> None:
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(height, width) < patch:
        side = min(height, width)
        raise ValueError(f"image side {side} is smaller than the patch size {patch}")


def num_patches(height: int, width: int, patch: int, stride: int) -> int:
    """Number of tiles per image."""
    return len(grid(height, width, patch, stride))


def extract_patches(x: Tensor, patch: int, stride: int) -> Tensor:
    """Cut ``x`` ([B, C, H, W]) into tiles: ``[B * N, C, patch, patch]``.

    Tiles of image ``b`` occupy rows ``b * N ... (b + 1) * N - 1`` in row-major grid order, so
    per-image quantities repeat with ``repeat_interleave(N)``. Differentiable (plain slicing).
    """
    return unfold(x, grid(*x.shape[-2:], patch, stride), patch, patch)


def fold_patches(patches: Tensor, height: int, width: int, patch: int, stride: int) -> Tensor:
    """Inverse of :func:`extract_patches`: average the tiles back into ``[B, C, height, width]``.

    Every pixel is the mean of the tiles that cover it. The sums are accumulated in float64, so
    a constant field and ``fold_patches(extract_patches(x))`` come back exactly (up to 9 overlaps
    of float32 values add without rounding). Differentiable.
    """
    return fold(patches, grid(height, width, patch, stride), height, width, dtype=torch.float64)


@dataclasses.dataclass
class PatchedOutput(ModelOutput):
    """A :class:`ModelOutput` folded from a patch grid, with the per-patch outputs kept for
    guidance that works patch by patch (the released BIR-D / GDP losses).

    Attributes:
        patches: the per-patch outputs, ``[B * N, C, patch, patch]`` in the row order of
            :func:`extract_patches` (x0 clipped when the wrapper clips).
        positions: ``(top, left)`` of the N tiles of each image.
    """

    patches: ModelOutput | None = None
    positions: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class PatchGridModel:
    """Run ``model`` on the overlapping patch grid of ``x_t`` and average the overlaps.

    Args:
        model: ``(x_t [b, C, patch, patch], i LongTensor[b]) -> ModelOutput``.
        patch: tile size (the prior's training resolution).
        stride: grid stride (None: ``patch // 2``, the papers' 128 for 256).
        batch_size: tiles per model call (None: all tiles of the batch at once).
        clip_x0: clamp each tile's x0 to [-1, 1] before averaging (the released code clips per
            patch; clipping after averaging would not be the same).

    Calling it returns a :class:`PatchedOutput` ``[B, C, H, W]`` with eps, x0 and the
    log-variance averaged over the tiles covering each pixel. Raises ValueError when a side is
    smaller than the patch.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], ModelOutput],
        patch: int,
        stride: int | None = None,
        batch_size: int | None = None,
        clip_x0: bool = True,
    ):
        self.model, self.patch = model, int(patch)
        self.stride = int(stride or max(self.patch // 2, 1))
        self.batch_size, self.clip_x0 = batch_size, clip_x0

    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        """The grid for an image of this size (validates it)."""
        return grid(height, width, self.patch, self.stride)

    def __call__(self, x_t: Tensor, i: Tensor) -> PatchedOutput:
        h, w = x_t.shape[-2:]
        positions = self.positions(h, w)
        n = len(positions)
        tiles = extract_patches(x_t, self.patch, self.stride)
        steps = i.repeat_interleave(n)
        chunk = self.batch_size or tiles.shape[0]
        outs = [
            self.model(tiles[lo : lo + chunk], steps[lo : lo + chunk])
            for lo in range(0, tiles.shape[0], chunk)
        ]
        eps = torch.cat([o.eps for o in outs])
        x0 = torch.cat([o.x0 for o in outs])
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        log_var = None
        if outs[0].log_variance is not None:
            log_var = torch.cat([o.log_variance.expand_as(o.eps) for o in outs])
        per_patch = ModelOutput(eps=eps, x0=x0, log_variance=log_var)

        def fold(v: Tensor | None) -> Tensor | None:
            return None if v is None else fold_patches(v, h, w, self.patch, self.stride)

        return PatchedOutput(
            eps=fold(eps),
            x0=fold(x0),
            log_variance=fold(log_var),
            patches=per_patch,
            positions=positions,
        )

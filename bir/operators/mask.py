"""Inpainting: ``y = m . x`` with a binary mask (1 = observed, 0 = missing)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bir.operators.base import Operator, Shape, batch_size_of


def box_mask(height: int, width: int, box_size: int | None = None) -> torch.Tensor:
    """``[1, 1, H, W]`` ones with a centred square hole of ``box_size`` pixels (default: the
    BIRD reference's 80/256 of the shorter side)."""
    if box_size is None:
        box_size = round(min(height, width) * 80 / 256)
    mask = torch.ones(1, 1, height, width)
    top, left = (height - box_size) // 2, (width - box_size) // 2
    mask[..., top : top + box_size, left : left + box_size] = 0.0
    return mask


def random_pixel_mask(
    height: int, width: int, keep_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """``[1, 1, H, W]``: each pixel observed with probability ``keep_ratio`` (all channels)."""
    u = torch.rand(height, width, generator=generator, device=generator.device)
    return (u < keep_ratio).float().view(1, 1, height, width)


class InpaintMask(Operator):
    """Multiply by a binary mask; :meth:`loss_mask` returns it so the data term only counts
    observed pixels.

    The mask is either given (``mask``: ``[H, W]``, ``[1|B, 1|C, H, W]``) or generated per image
    at the observation's size on first use: ``kind="box"`` (centred square hole of ``box_size``)
    or ``kind="random"`` (pixels kept with probability ``keep_ratio``, drawn from the image's
    generator passed to :meth:`init_batch`, at the clean image's size).

    Args:
        mask: the mask, or None to generate one.
        kind: ``box`` | ``random`` when ``mask`` is None.
        box_size: hole size in pixels for ``box`` (None: 80/256 of the shorter side).
        keep_ratio: fraction of observed pixels for ``random``.
    """

    def __init__(
        self,
        mask: torch.Tensor | Sequence | None = None,
        kind: str = "box",
        box_size: int | None = None,
        keep_ratio: float = 0.25,
    ):
        super().__init__()
        if kind not in ("box", "random"):
            raise ValueError(f"kind must be box or random, got {kind!r}")
        self.kind, self.box_size, self.keep_ratio = kind, box_size, keep_ratio
        given = None if mask is None else torch.as_tensor(mask, dtype=torch.float32)
        while given is not None and given.ndim < 4:
            given = given.unsqueeze(0)
        self.register_buffer("mask", given, persistent=False)
        self._given = given is not None
        self._seeds: list[int] = [0]

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """Draw each image's mask at the clean image's size (``random``: from the image's
        generator; without generators image ``b`` uses seed ``b``)."""
        b = batch_size_of(shape, generators)
        if generators is None:
            self._seeds = list(range(b))
        else:  # one seed per image: the same mask whatever device the generators are on
            self._seeds = [
                int(torch.randint(2**62, (), generator=g, device=g.device)) for g in generators
            ]
        if not self._given:
            device = generators[0].device if generators else self._device()
            self.mask = None
            self.mask = self._draw(*shape[-2:]).to(device)

    def _draw(self, h: int, w: int) -> torch.Tensor:
        if self.kind == "box":
            return box_mask(h, w, self.box_size)
        gens = [torch.Generator().manual_seed(s) for s in self._seeds]
        return torch.cat([random_pixel_mask(h, w, self.keep_ratio, g) for g in gens])

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask for a batch like ``x`` (``[B or 1, 1 or C, H, W]``); a generated mask of
        another size is redrawn at x's size (the same seeds)."""
        h, w = x.shape[-2:]
        if self.mask is None or self.mask.shape[-2:] != (h, w):
            if self._given:
                raise ValueError(f"mask is {tuple(self.mask.shape[-2:])}, image is {(h, w)}")
            self.mask = self._draw(h, w).to(x.device)
        return self.mask.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> masked ``[B, C, H, W]`` (missing pixels 0)."""
        return x * self.mask_for(x)

    def forward_window(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        return x * self.mask[..., top : top + h, left : left + w].to(x.dtype)

    def loss_mask(self) -> torch.Tensor | None:
        return self.mask

    def estimate(self) -> dict[str, torch.Tensor]:
        return {} if self.mask is None else {"mask": self.mask.detach().clone()}

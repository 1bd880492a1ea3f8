"""Composition of operators: ``A = A_n o ... o A_1``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bir.operators.base import Operator, Shape


class Compose(Operator):
    """Apply ``ops`` in order (the first is applied to x first), e.g. blur then downsample.

    Estimates of the parts are merged; a name used by two parts gets the part index as suffix
    (``kernel``, ``kernel_1``). The loss mask is the last part's that has one.

    Args:
        ops: the operators, in application order.
    """

    def __init__(self, ops: Sequence[Operator]):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op(x)
        return x

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """Each part gets the shape of what reaches it (the previous part's output)."""
        shape = list(shape)
        for op in self.ops:
            op.init_batch(shape, generators)
            shape = [*shape[:2], *op.output_size(tuple(shape[-2:]))]

    def param_groups(self, lr: float) -> list[dict]:
        return [group for op in self.ops for group in op.param_groups(lr)]

    def estimate(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, op in enumerate(self.ops):
            for name, value in op.estimate().items():
                out[name if name not in out else f"{name}_{i}"] = value
        return out

    def loss_mask(self) -> torch.Tensor | None:
        for op in reversed(self.ops):
            mask = op.loss_mask()
            if mask is not None:
                return mask
        return None

    def input_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        for op in reversed(self.ops):
            out_hw = op.input_size(out_hw)
        return tuple(out_hw)

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        for op in self.ops:
            in_hw = op.output_size(in_hw)
        return tuple(in_hw)

    def forward_window(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        for op in self.ops:
            x = op.forward_window(x, top, left)
        return x

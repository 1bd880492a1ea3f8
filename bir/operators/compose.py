"""Composition of operators: ``A = A_n o ... o A_1``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bir.operators.base import Operator


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
        self.learnable = any(op.learnable for op in self.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op(x)
        return x

    def init_batch(self, batch_size: int, generators: list[torch.Generator] | None = None) -> None:
        for op in self.ops:
            op.init_batch(batch_size, generators)

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
            if hasattr(op, "input_size"):
                out_hw = op.input_size(out_hw)
        return out_hw

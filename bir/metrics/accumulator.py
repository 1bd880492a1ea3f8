"""A DDP-safe running summary of per-image metric values (a torchmetrics ``Metric``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from bir.metrics.summary import split_finite, stats_from_sums


class MetricAccumulator(Metric):
    """Running sum, sum of squares and count per metric name, reduced by summation across ranks.

    The mean is ``sum / count`` over *all* images of all ranks (not a mean of per-rank means), so it
    equals the single-process result whatever the split. Non-finite values are counted in
    ``nonfinite`` and left out of the mean (the policy of this module).

    Args:
        names: metric names, fixed up front (states must have the same shape on every rank).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.names = list(names)
        k = len(self.names)
        for state in ("total", "total_sq", "count", "nonfinite"):
            self.add_state(state, torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Mapping[str, Tensor | float | Sequence[float]]) -> None:
        """Add per-image values: ``{name: Tensor[B] or float}``; unknown names are an error."""
        for name, value in values.items():
            if name not in self.names:
                raise KeyError(f"{name!r} is not one of the accumulated metrics {self.names}")
            i = self.names.index(name)
            v = torch.as_tensor(value, dtype=torch.float64, device=self.total.device)
            finite, nonfinite = split_finite(v)
            self.total[i] += finite.sum()
            self.total_sq[i] += finite.pow(2).sum()
            self.count[i] += finite.numel()
            self.nonfinite[i] += nonfinite

    def compute(self) -> dict[str, dict[str, float]]:
        """``{name: {"mean", "std" (population), "count", "nonfinite"}}``; NaN mean when empty."""
        return {
            name: stats_from_sums(self.total[i], self.total_sq[i], self.count[i], self.nonfinite[i])
            for i, name in enumerate(self.names)
        }

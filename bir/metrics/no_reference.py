"""No-reference image quality (NIQE, MUSIQ, MANIQA, CLIP-IQA) through pyiqa (optional extra
``iqa``), weights from local files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from bir.metrics.weights import hub_offline
from bir.nets.checkpoints import missing_checkpoint_error

#: bir metric names -> pyiqa metric names.
NO_REFERENCE_METRICS = {"niqe": "niqe", "musiq": "musiq", "maniqa": "maniqa", "clipiqa": "clipiqa"}


class NoReferenceIQA(nn.Module):
    """A pyiqa no-reference metric (NIQE, MUSIQ, MANIQA, CLIP-IQA) with weights from a local file.

    Args:
        name: a key of :data:`NO_REFERENCE_METRICS`.
        weights_path: the metric's weights file (pyiqa release name); None leaves it to pyiqa's
            own cache, which must already hold the file (``HF_HUB_OFFLINE`` is set).
    """

    def __init__(self, name: str, weights_path: str | os.PathLike | None = None):
        super().__init__()
        if name not in NO_REFERENCE_METRICS:
            raise ValueError(
                f"unknown no-reference metric {name!r}; known: {sorted(NO_REFERENCE_METRICS)}"
            )
        hub_offline()  # pyiqa may consult the Hugging Face hub: fail at once, offline
        try:
            import pyiqa
        except ImportError as err:
            raise ImportError(
                f"the no-reference metric {name!r} needs pyiqa, which is not installed: "
                "pip install 'bir[iqa]' (or pip install pyiqa)"
            ) from err
        kwargs = {}
        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise missing_checkpoint_error(
                    weights_path,
                    f"{name} (pyiqa)",
                    "https://github.com/chaofengc/IQA-PyTorch/releases",
                    f"weights.{name}",
                )
            kwargs["pretrained_model_path"] = str(weights_path)
        self.metric = pyiqa.create_metric(NO_REFERENCE_METRICS[name], device="cpu", **kwargs)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, 3, H, W]`` in [0, 1] -> ``Tensor[B]``."""
        return self.metric(x.float().clamp(0, 1)).reshape(-1)

"""Distribution metrics between two image sets: FID (Heusel et al. 2017) and KID
(Binkowski et al. 2018) through torchmetrics, with torch-fidelity's Inception from a local file
or any feature network."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchmetrics import Metric

from bir.metrics.weights import weights_path


class _FloatImages(nn.Module):
    """Feeds [0, 1] floats to a custom extractor as is; output ``[B, num_features]``."""

    def __init__(self, extractor: nn.Module, num_features: int):
        super().__init__()
        self.extractor, self.num_features = extractor, num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x.float()).flatten(1)


def _feature_module(
    feature_extractor: nn.Module | None, inception_weights: str | os.PathLike | None
) -> tuple[int | nn.Module, dict]:
    """``feature`` argument and extra kwargs for torchmetrics FID/KID."""
    if feature_extractor is not None:
        feature_extractor = feature_extractor.eval()
        with torch.no_grad():
            dim = feature_extractor(torch.rand(1, 3, 32, 32)).flatten(1).shape[1]
        return _FloatImages(feature_extractor, dim), {}
    path = weights_path("inception", inception_weights)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "FID/KID with the Inception network need torch-fidelity "
            "(pip install 'bir[eval]' or pip install torch-fidelity); "
            "or pass feature_extractor= for a custom network"
        ) from err
    return 2048, {"normalize": True, "feature_extractor_weights_path": str(path)}


def distribution_metrics(
    pred_images: Iterable[Tensor],
    gt_images: Iterable[Tensor],
    metrics: Sequence[str] = ("fid",),
    feature_extractor: nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """FID (Heusel et al. 2017) and/or KID (Binkowski et al. 2018) between two image sets.

    Args:
        pred_images, gt_images: iterables of ``[3, H, W]`` (or ``[B, 3, H, W]``) in [0, 1], each
            consumed once; sizes may differ between items (each is passed on its own).
        metrics: subset of ``("fid", "kid")``.
        feature_extractor: a network ``[B, 3, H, W] in [0, 1] -> [B, D]`` used instead of
            Inception (tests, domain-specific features).
        inception_weights: torch-fidelity ``pt_inception-2015-12-05-6726825d.pth``.
        kid_subset_size: KID subset size (reduced to the number of images when fewer).
    Returns:
        ``{"fid": float, "kid": float, "kid_std": float}`` for the requested metrics.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    unknown = set(metrics) - {"fid", "kid"}
    if unknown:
        raise ValueError(f"unknown distribution metrics {sorted(unknown)}")
    feature, kwargs = _feature_module(feature_extractor, inception_weights)
    running: dict[str, Metric] = {}
    for name in metrics:
        if name == "fid":
            running[name] = FrechetInceptionDistance(feature=feature, **kwargs)
        else:
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            running[name] = KernelInceptionDistance(
                feature=feature, subsets=kid_subsets, subset_size=kid_subset_size, **kwargs
            )
        running[name] = running[name].to(device)  # torchmetrics keeps its sums in float64
    counts = {}
    # Each iterable is consumed once (images are streamed, not held in memory).
    for images, real in ((gt_images, True), (pred_images, False)):
        n = 0
        for img in images:
            batch = (img if img.ndim == 4 else img[None]).to(device).float().clamp(0, 1)
            n += batch.shape[0]
            for metric in running.values():
                metric.update(batch, real=real)
        counts[real] = n
    n = min(counts.values())
    if n < 2:
        raise ValueError(f"FID/KID need at least two images in each set, got {n}")
    out: dict[str, float] = {}
    for name, metric in running.items():
        if name == "fid":
            out["fid"] = float(metric.compute())
        else:
            metric.subset_size = min(kid_subset_size, n)
            mean, std = metric.compute()
            out["kid"], out["kid_std"] = float(mean), float(std)
    return out

"""Image quality metrics: PSNR/SSIM (RGB or Y, BasicSR conventions), LPIPS, DISTS, FID/KID and
no-reference IQA, one name -> metric table, and the summaries every tool writes.

All full-reference metrics take float NCHW RGB batches in [0, 1] on any device and return one
value per image (``Tensor[B]``, float64 for PSNR/SSIM). Backbone weights are read from local
files only (``paths.weights``); a missing file raises
:class:`bir.nets.checkpoints.MissingCheckpointError` naming the file, where it is published and
the config key to set. Nothing is downloaded at run time.

- :mod:`~bir.metrics.fidelity`: PSNR, SSIM, BT.601 Y.
- :mod:`~bir.metrics.perceptual`: LPIPS, DISTS (torchmetrics networks, torchvision backbones).
- :mod:`~bir.metrics.distribution`: FID, KID between two image sets.
- :mod:`~bir.metrics.no_reference`: NIQE, MUSIQ, MANIQA, CLIP-IQA through pyiqa.
- :mod:`~bir.metrics.registry`: the name -> metric table (:data:`METRICS`).
- :mod:`~bir.metrics.accumulator`: the running, DDP-reduced summary of a validation or eval.
- :mod:`~bir.metrics.summary`: mean/std/count per metric and the one
  policy for non-finite values (the infinite PSNR of identical images): left out of the mean and
  counted next to it, everywhere.
- :mod:`~bir.metrics.weights`: the release files of the backbones and their local paths.
"""

from bir.metrics.distribution import distribution_metrics
from bir.metrics.fidelity import psnr, rgb_to_y, ssim
from bir.metrics.no_reference import NO_REFERENCE_METRICS, NoReferenceIQA
from bir.metrics.perceptual import DISTS, LPIPS, dists, lpips, lpips_vgg
from bir.metrics.registry import (
    DISTRIBUTION,
    DISTRIBUTION_METRICS,
    FULL_REFERENCE,
    FULL_REFERENCE_METRICS,
    METRICS,
    NO_REFERENCE,
    MetricSpec,
    check_metric_names,
    metric_weights,
    per_image_metric,
)
from bir.metrics.summary import (
    NONFINITE_SUFFIX,
    flat_means,
    jsonable,
    parse_value,
    record_value,
    split_finite,
    strict_json,
    summarize,
    summarize_columns,
    summary_table,
)
from bir.metrics.weights import WEIGHT_FILES, default_weights_dir, weights_path


def __getattr__(name: str):
    """``MetricAccumulator`` is imported when first used: torchmetrics takes seconds to import,
    and ``bir-report`` needs only the summaries."""
    if name == "MetricAccumulator":
        from bir.metrics.accumulator import MetricAccumulator

        return MetricAccumulator
    raise AttributeError(f"module 'bir.metrics' has no attribute {name!r}")


__all__ = [
    "DISTRIBUTION",
    "DISTRIBUTION_METRICS",
    "DISTS",
    "FULL_REFERENCE",
    "FULL_REFERENCE_METRICS",
    "LPIPS",
    "METRICS",
    "NONFINITE_SUFFIX",
    "NO_REFERENCE",
    "NO_REFERENCE_METRICS",
    "WEIGHT_FILES",
    "MetricAccumulator",
    "MetricSpec",
    "NoReferenceIQA",
    "check_metric_names",
    "default_weights_dir",
    "dists",
    "distribution_metrics",
    "flat_means",
    "jsonable",
    "lpips",
    "lpips_vgg",
    "metric_weights",
    "parse_value",
    "per_image_metric",
    "psnr",
    "record_value",
    "rgb_to_y",
    "split_finite",
    "ssim",
    "strict_json",
    "summarize",
    "summarize_columns",
    "summary_table",
    "weights_path",
]

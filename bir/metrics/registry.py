"""The one table from metric names to metrics, used by ``bir-eval``, the prediction writer and the
training modules: what kind each metric is, which weights file it reads, and how to build it."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bir.errors import UsageError
from bir.metrics.fidelity import psnr, ssim
from bir.metrics.no_reference import NO_REFERENCE_METRICS, NoReferenceIQA
from bir.metrics.perceptual import dists, lpips
from bir.metrics.weights import weights_path

FULL_REFERENCE = "full-reference"  # per image, against its ground truth
NO_REFERENCE = "no-reference"  # per image, no ground truth
DISTRIBUTION = "distribution"  # between two sets of images


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its ``kind``, the key of its file in a ``weights`` mapping (``conf/eval.yaml``
    ``weights:``) and the :data:`bir.metrics.weights.WEIGHT_FILES` entry of its backbone."""

    kind: str
    weights_key: str | None = None
    backbone: str | None = None


#: Every metric bir computes, by the name used in configs, CSV columns and logs.
METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec(FULL_REFERENCE),
    "ssim": MetricSpec(FULL_REFERENCE),
    "lpips": MetricSpec(FULL_REFERENCE, "lpips_alex", "alex"),
    "lpips_vgg": MetricSpec(FULL_REFERENCE, "lpips_vgg", "vgg"),
    "dists": MetricSpec(FULL_REFERENCE, "dists", "dists"),
    "fid": MetricSpec(DISTRIBUTION, "inception", "inception"),
    "kid": MetricSpec(DISTRIBUTION, "inception", "inception"),
    **{name: MetricSpec(NO_REFERENCE, name) for name in NO_REFERENCE_METRICS},
}

#: Per-image metrics against a ground truth: ``fn(x, y) -> Tensor[B]``.
FULL_REFERENCE_METRICS = tuple(n for n, s in METRICS.items() if s.kind == FULL_REFERENCE)
#: Metrics computed between whole folders.
DISTRIBUTION_METRICS = tuple(n for n, s in METRICS.items() if s.kind == DISTRIBUTION)


def check_metric_names(
    names: Iterable[str], setting: str = "metrics", kinds: Iterable[str] | None = None
) -> list[str]:
    """``names`` as a list, or :class:`UsageError` naming ``setting``, the unknown names and the
    known ones (or the names whose kind ``setting`` cannot compute)."""
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UsageError(f"{setting}: unknown metrics {unknown}; known: {sorted(METRICS)}")
    kinds = set(kinds) if kinds is not None else {FULL_REFERENCE, NO_REFERENCE, DISTRIBUTION}
    wrong = [n for n in names if METRICS[n].kind not in kinds]
    if wrong:
        kind = METRICS[wrong[0]].kind
        here = sorted(n for n, s in METRICS.items() if s.kind in kinds)
        hint = (
            "; score the folders after the run: bir-eval pred=<output> gt=<gt> "
            f"metrics=[{','.join(wrong)}]"
            if kind == DISTRIBUTION
            else ""
        )
        raise UsageError(
            f"{setting}: {wrong} are {kind} metrics, which are not computed here; "
            f"choose among {here}{hint}"
        )
    return names


def metric_weights(
    name: str,
    weights: Mapping[str, str | os.PathLike | None] | None = None,
    weights_dir: str | os.PathLike | None = None,
    config_key: str | None = None,
) -> Path | None:
    """The weights file metric ``name`` reads: ``weights[<its key>]`` when set, else its release
    file under ``weights_dir`` (default ``$BIR_WEIGHTS``); a backbone file that is not there
    raises :class:`bir.nets.checkpoints.MissingCheckpointError` naming ``config_key``. None for
    metrics without weights (PSNR, SSIM) and unset no-reference weights (pyiqa's cache)."""
    spec = METRICS[name]
    configured = (weights or {}).get(spec.weights_key) if spec.weights_key else None
    if spec.backbone is None:
        return Path(configured) if configured not in (None, "") else None
    return weights_path(spec.backbone, configured, weights_dir, config_key)


def per_image_metric(
    name: str,
    weights: Mapping[str, str | os.PathLike | None] | None = None,
    crop_border: int = 0,
    y_channel: bool = False,
    weights_dir: str | os.PathLike | None = None,
    config_key: str | None = None,
    device: torch.device | str = "cpu",
) -> Callable[..., Tensor]:
    """The per-image metric ``name``: ``fn(x, y) -> Tensor[B]`` (full-reference) or
    ``fn(x) -> Tensor[B]`` (no-reference), for ``[B, 3, H, W]`` in [0, 1].

    Its weights file is resolved (and a missing one raised) here, before any image is scored.
    ``crop_border`` and ``y_channel`` apply to PSNR/SSIM.
    """
    check_metric_names([name], kinds=(FULL_REFERENCE, NO_REFERENCE))
    path = metric_weights(name, weights, weights_dir, config_key)
    if name in ("psnr", "ssim"):
        fn = psnr if name == "psnr" else ssim
        return functools.partial(fn, crop_border=crop_border, y_channel=y_channel)
    if name in ("lpips", "lpips_vgg"):
        net = METRICS[name].backbone
        return lambda x, y: lpips(x, y, net=net, weights_path=path)
    if name == "dists":
        return lambda x, y: dists(x, y, weights_path=path)
    return NoReferenceIQA(name, path).to(device)

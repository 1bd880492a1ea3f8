"""Image quality metrics: PSNR/SSIM (RGB or Y, BasicSR conventions), LPIPS, DISTS, FID/KID and
no-reference IQA, plus a DDP-safe running accumulator.

All full-reference metrics take float NCHW RGB batches in [0, 1] on any device and return one
value per image (``Tensor[B]``, float64 for PSNR/SSIM). Backbone weights are read from local
files only (``paths.weights``); a missing file raises
:class:`bir.nets.checkpoints.MissingCheckpointError` naming the file, where it is published and
the config key to set. Nothing is downloaded at run time.

PSNR/SSIM follow BasicSR ``calculate_psnr``/``calculate_ssim`` (and therefore skimage with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``): values are computed on the
[0, 255] scale, SSIM uses an 11x11 Gaussian window (sigma 1.5) over the *valid* region with
K1 = 0.01, K2 = 0.03, RGB SSIM is the mean of the per-channel SSIMs, and the Y channel is
ITU-R BT.601 ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (RGB in [0, 1], Y in [16, 235]).
Deviation: BasicSR rounds to 8-bit first (its inputs are uint8 files); here float inputs are used
as given, so round them yourself to reproduce 8-bit figures exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from bir.nets.checkpoints import (
    load_checkpoint,
    load_state_dict_checked,
    missing_checkpoint_error,
    strip_prefix,
)

# Nothing in this module may reach the network: hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# BT.601 luma weights for RGB in [0, 1] giving Y on the [0, 255] scale (BasicSR rgb2ycbcr).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

#: Weights files each backbone needs: file name (torchvision / torch-fidelity release names),
#: where it is published, and the config key of ``conf/eval.yaml`` that sets its path.
WEIGHT_FILES: dict[str, dict[str, str]] = {
    "alex": {
        "file": "alexnet-owt-7be5be79.pth",
        "url": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "key": "weights.lpips_alex",
    },
    "vgg": {
        "file": "vgg16-397923af.pth",
        "url": "https://download.pytorch.org/models/vgg16-397923af.pth",
        "key": "weights.lpips_vgg",
    },
    "dists": {
        "file": "vgg16-397923af.pth",
        "url": "https://download.pytorch.org/models/vgg16-397923af.pth",
        "key": "weights.dists",
    },
    "inception": {
        "file": "pt_inception-2015-12-05-6726825d.pth",
        "url": "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "pt_inception-2015-12-05-6726825d.pth",
        "key": "weights.inception",
    },
}


def default_weights_dir() -> Path:
    """``$BIR_WEIGHTS`` or ``./weights`` (the default of ``paths.weights``)."""
    return Path(os.environ.get("BIR_WEIGHTS", "weights"))


def _weights_path(kind: str, path: str | os.PathLike | None) -> Path:
    """The configured path, or the release file name under :func:`default_weights_dir`."""
    info = WEIGHT_FILES[kind]
    resolved = Path(path) if path not in (None, "") else default_weights_dir() / info["file"]
    if not resolved.is_file():
        raise missing_checkpoint_error(
            resolved, f"{kind} backbone ({info['file']})", info["url"], info["key"]
        )
    return resolved


# --------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------
def rgb_to_y(x: Tensor) -> Tensor:
    """BT.601 luma as BasicSR ``rgb2ycbcr(y_only=True)``.

    Args:
        x: ``[B, 3, H, W]`` RGB in [0, 1].
    Returns:
        ``[B, 1, H, W]`` Y on the [0, 255] scale (16 for black, 235 for white).
    """
    w = x.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) + _Y_OFFSET


def _prepare(
    x: Tensor, y: Tensor, crop_border: int, y_channel: bool, data_range: float
) -> tuple[Tensor, Tensor]:
    """Check shapes, crop borders, convert to Y or scale to [0, 255]; float64."""
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] batches, got shape {tuple(x.shape)}")
    x, y = x.double(), y.to(x.device).double()
    if crop_border > 0:
        c = crop_border
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
        if x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"crop_border={crop_border} leaves an empty image")
    x, y = x / data_range, y / data_range
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError("y_channel=True needs RGB inputs")
        return rgb_to_y(x), rgb_to_y(y)
    return x * 255.0, y * 255.0


def psnr(
    x: Tensor,
    y: Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(255^2 / MSE)`` on the [0, 255] scale.

    Args:
        x, y: ``[B, C, H, W]`` in [0, data_range].
        crop_border: pixels removed from every side first.
        y_channel: compare BT.601 Y (BasicSR ``test_y_channel``) instead of all channels.
    Returns:
        ``Tensor[B]`` float64 in dB; ``inf`` where the images are identical.
    """
    a, b = _prepare(x, y, crop_border, y_channel, data_range)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    """Normalised 2-D Gaussian ``[size, size]`` (cv2.getGaussianKernel outer product)."""
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: Tensor,
    y: Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13) as BasicSR ``calculate_ssim``.

    Gaussian window 11, sigma 1.5, valid region only, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,
    population (not sample) covariance; multi-channel images average the per-channel SSIMs.

    Args:
        x, y: ``[B, C, H, W]`` in [0, data_range], at least 11x11 after cropping.
    Returns:
        ``Tensor[B]`` float64, 1 for identical images.
    """
    a, b = _prepare(x, y, crop_border, y_channel, data_range)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {tuple(a.shape[-2:])}")
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    channels = a.shape[1]
    win = _gaussian_window(11, 1.5, a.device).expand(channels, 1, 11, 11).contiguous()

    def blur(t: Tensor) -> Tensor:  # depthwise, valid region (BasicSR crops 5 px after filter2D)
        return F.conv2d(t, win, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


# --------------------------------------------------------------------------------------------
# LPIPS and DISTS (torchmetrics networks, backbones from local torchvision files)
# --------------------------------------------------------------------------------------------
def _torchvision_features(path: Path, what: str, url: str, key: str) -> dict[str, Tensor]:
    """``features.*`` of a torchvision AlexNet/VGG16 file (full or features-only) without prefix."""
    state = load_checkpoint(path, what=what, url=url, config_key=key)
    features = strip_prefix(state, "features.")
    if not features:
        raise RuntimeError(
            f"{what} checkpoint {path} has no 'features.*' keys (torchvision layout)"
        )
    return features


def _sliced_state(module: nn.Module, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision ``features.<i>.*`` to the ``slice<k>.<i>.*``/``stage<k>.<i>.*`` layout
    torchmetrics uses (the layer index ``i`` is kept as the child name)."""
    out = {}
    for name, _ in module.named_parameters():
        parts = name.split(".")
        if len(parts) == 3:  # slice2.3.weight -> 3.weight
            out[name] = features.get(".".join(parts[1:]), torch.empty(0))
    return out


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with torchmetrics' network and linear heads (shipped with
    torchmetrics) and the ImageNet backbone from a local torchvision file.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        backbone_path: torchvision ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` (full
            model or only ``features.*``); default: the release name under ``$BIR_WEIGHTS``.
    """

    def __init__(self, net: str = "alex", backbone_path: str | os.PathLike | None = None):
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        path = _weights_path(net, backbone_path)
        info = WEIGHT_FILES[net]
        features = _torchvision_features(path, f"LPIPS {net} backbone", info["url"], info["key"])
        # pnet_rand: build the backbone without torchvision's downloader, then load our file.
        self.model = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
        load_state_dict_checked(
            self.model.net, _sliced_state(self.model.net, features), name=f"LPIPS {net} backbone"
        )
        self.model.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x, y``: ``[B, 3, H, W]`` in [0, 1] -> ``Tensor[B]`` (0 for identical images)."""
        return self.model(x.float().clamp(0, 1), y.float().clamp(0, 1), normalize=True).flatten()


@contextmanager
def _vgg16_from(features: Mapping[str, Tensor]):
    """Make torchmetrics' ``vgg16(weights=...)`` return our loaded features instead of
    downloading (DISTSNetwork has no argument for a local backbone)."""
    from torchmetrics.functional.image import dists as tm_dists
    from torchvision.models.vgg import cfgs, make_layers

    layers = make_layers(cfgs["D"])
    load_state_dict_checked(layers, dict(features), name="DISTS VGG16 features")
    with mock.patch.object(
        tm_dists, "vgg16", lambda weights=None: SimpleNamespace(features=layers)
    ):
        yield


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020) with torchmetrics' network and alpha/beta weights (shipped with
    torchmetrics) and a local torchvision VGG16 file.

    Args:
        backbone_path: torchvision ``vgg16-397923af.pth`` (full or ``features.*`` only).
    """

    def __init__(self, backbone_path: str | os.PathLike | None = None):
        super().__init__()
        from torchmetrics.functional.image.dists import DISTSNetwork

        path = _weights_path("dists", backbone_path)
        info = WEIGHT_FILES["dists"]
        features = _torchvision_features(path, "DISTS VGG16 backbone", info["url"], info["key"])
        with _vgg16_from(features):
            self.model = DISTSNetwork(load_weights=True)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x, y``: ``[B, 3, H, W]`` in [0, 1] -> ``Tensor[B]`` (0 for identical images)."""
        return self.model(x.float(), y.float()).reshape(-1)


_MODEL_CACHE: dict[tuple, nn.Module] = {}


def _cached(key: tuple, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    key = (*key, str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = build().to(device).eval()
    return _MODEL_CACHE[key]


def lpips(
    x: Tensor, y: Tensor, net: str = "alex", weights_path: str | os.PathLike | None = None
) -> Tensor:
    """LPIPS per image (``Tensor[B]``) for ``[B, 3, H, W]`` in [0, 1]; the model is cached."""
    model = _cached(("lpips", net, str(weights_path)), lambda: LPIPS(net, weights_path), x.device)
    return model(x, y.to(x.device))


def lpips_vgg(x: Tensor, y: Tensor, weights_path: str | os.PathLike | None = None) -> Tensor:
    """LPIPS with the VGG16 backbone (``Tensor[B]``)."""
    return lpips(x, y, net="vgg", weights_path=weights_path)


def dists(x: Tensor, y: Tensor, weights_path: str | os.PathLike | None = None) -> Tensor:
    """DISTS per image (``Tensor[B]``) for ``[B, 3, H, W]`` in [0, 1]; the model is cached."""
    model = _cached(("dists", str(weights_path)), lambda: DISTS(weights_path), x.device)
    return model(x, y.to(x.device))


# --------------------------------------------------------------------------------------------
# FID / KID between image sets
# --------------------------------------------------------------------------------------------
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
    path = _weights_path("inception", inception_weights)
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


# --------------------------------------------------------------------------------------------
# No-reference IQA through pyiqa (optional extra "iqa")
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Accumulation across batches and DDP ranks
# --------------------------------------------------------------------------------------------
class MetricAccumulator(Metric):
    """Running sum, sum of squares and count per metric name, reduced by summation across ranks.

    The mean is ``sum / count`` over *all* images of all ranks (not a mean of per-rank means), so it
    equals the single-process result whatever the split. Non-finite values (PSNR of identical
    images is ``inf``) are counted in ``nonfinite`` and left out of the mean.

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
            v = torch.as_tensor(value, dtype=torch.float64, device=self.total.device).reshape(-1)
            finite = torch.isfinite(v)
            self.total[i] += v[finite].sum()
            self.total_sq[i] += v[finite].pow(2).sum()
            self.count[i] += finite.sum()
            self.nonfinite[i] += (~finite).sum()

    def compute(self) -> dict[str, dict[str, float]]:
        """``{name: {"mean", "std" (population), "count", "nonfinite"}}``; NaN mean when empty."""
        out = {}
        for i, name in enumerate(self.names):
            n = float(self.count[i])
            mean = float(self.total[i]) / n if n else math.nan
            var = max(float(self.total_sq[i]) / n - mean**2, 0.0) if n else math.nan
            out[name] = {
                "mean": mean,
                "std": math.sqrt(var),
                "count": int(n),
                "nonfinite": int(self.nonfinite[i]),
            }
        return out


#: Per-image full-reference metrics by name: ``fn(x, y, crop_border, y_channel) -> Tensor[B]``.
FULL_REFERENCE_METRICS = ("psnr", "ssim", "lpips", "lpips_vgg", "dists")
#: Metrics computed between whole folders.
DISTRIBUTION_METRICS = ("fid", "kid")

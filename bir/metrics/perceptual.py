"""Perceptual metrics: LPIPS and DISTS with torchmetrics' networks and ImageNet backbones read
from local torchvision files (:mod:`bir.metrics.weights`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor, nn

from bir.metrics.weights import WEIGHT_FILES, weights_path
from bir.nets.checkpoints import load_checkpoint, load_state_dict_checked, strip_prefix


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
        path = weights_path(net, backbone_path)
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

        path = weights_path("dists", backbone_path)
        info = WEIGHT_FILES["dists"]
        features = _torchvision_features(path, "DISTS VGG16 backbone", info["url"], info["key"])
        with _vgg16_from(features):
            self.model = DISTSNetwork(load_weights=True)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x, y``: ``[B, 3, H, W]`` in [0, 1] -> ``Tensor[B]`` (0 for identical images)."""
        return self.model(x.float(), y.float()).reshape(-1)


# Built models by (metric, weights file, device): a validation loop or a folder evaluation calls
# the functional forms once per batch and must not read the backbone file each time.
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

"""Where metric backbones come from: the release files each one needs and their local paths.

Nothing is downloaded at run time: a file that is not on disk raises
:class:`bir.nets.checkpoints.MissingCheckpointError` naming it, where it is published and the
config key that sets it.
"""

from __future__ import annotations

import os
from pathlib import Path

from bir.nets.checkpoints import missing_checkpoint_error

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


def weights_path(
    kind: str,
    path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    config_key: str | None = None,
) -> Path:
    """The backbone file of ``kind`` (a key of :data:`WEIGHT_FILES`), which must exist.

    Args:
        path: the configured file; None or "" means the release file name under ``weights_dir``.
        weights_dir: folder of release files; None means :func:`default_weights_dir`.
        config_key: the setting named in the error (default: the ``conf/eval.yaml`` key).
    """
    info = WEIGHT_FILES[kind]
    if path not in (None, ""):
        resolved = Path(path)
    else:
        resolved = Path(weights_dir or default_weights_dir()) / info["file"]
    if not resolved.is_file():
        raise missing_checkpoint_error(
            resolved, f"{kind} backbone ({info['file']})", info["url"], config_key or info["key"]
        )
    return resolved


def hub_offline() -> None:
    """Make Hugging Face hub look-ups fail at once instead of retrying (set where a model that
    may consult the hub is built, never at import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

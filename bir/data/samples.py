"""The real photographs that scikit-image ships, as an embedded sample dataset.

They are written once as PNG files under a cache folder, split into a training set and a
held-out set, so every dataset class and CLI in bir works on them like on any image folder:
``python -m bir.data.samples DIR`` writes ``DIR/train`` and ``DIR/holdout``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from bir.data.io import read_image, save_image

#: natural photographs (and photo-like micrographs) bundled with scikit-image, no download needed
TRAIN_PHOTOS = (
    "camera", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "coins", "moon",
    "retina", "brick", "grass", "gravel", "cell", "clock",
)  # fmt: skip
#: never used for training in bir's recipes; restoration quality is measured on these
HOLDOUT_PHOTOS = ("astronaut", "coffee")


def sample_photo(name: str) -> torch.Tensor:
    """One scikit-image photograph as [3, H, W] float in [0, 1]."""
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = arr[:, :, :3].astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def materialize_samples(root: str | Path) -> dict[str, Path]:
    """Write the sample photographs under ``root/train`` and ``root/holdout`` (once) and return
    both folders. Files are written atomically, so concurrent ranks cannot see partial files."""
    root = Path(root)
    out = {}
    for split, names in (("train", TRAIN_PHOTOS), ("holdout", HOLDOUT_PHOTOS)):
        folder = root / split
        for name in names:
            path = folder / f"{name}.png"
            if not path.exists():
                save_image(sample_photo(name), path)
        out[split] = folder
    return out


def holdout_image(name: str = "astronaut", size: int | None = None) -> torch.Tensor:
    """A held-out photograph [3, H, W] in [0, 1], centre-cropped to ``size`` if given."""
    img = sample_photo(name)
    if size is not None:
        _, h, w = img.shape
        top, left = (h - size) // 2, (w - size) // 2
        img = img[:, top : top + size, left : left + size]
    return img


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "data/samples")
    for split, folder in materialize_samples(root).items():
        n = len(list(folder.glob("*.png")))
        print(f"{split}: {n} images in {folder}")
        assert read_image(next(folder.glob("*.png"))).shape[0] == 3


if __name__ == "__main__":
    main()

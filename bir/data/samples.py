"""The real photographs that scikit-image ships, as an embedded sample dataset.

They are written once as PNG files under a cache folder, split into a training set and a
held-out set, so every dataset class and CLI in bir works on them like on any image folder:
``python -m bir.data.samples DIR`` writes ``DIR/train`` and ``DIR/holdout``;
``--scales 1 0.5 0.25`` adds area-downscaled copies of the training photographs (more image
content per 64-px crop for a prior, e.g. ``experiment=prior_folder``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from bir.data.io import read_image, save_image

#: natural photographs (and photo-like micrographs) bundled with scikit-image, no download needed
TRAIN_PHOTOS = (
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "moon",
    "retina",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
    "motorcycle_left",
    "motorcycle_right",
)
#: never used for training in bir's recipes; restoration quality is measured on these (the four
#: colour photographs of scenes; ``bir-bench quality`` averages over them)
HOLDOUT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def sample_photo(name: str) -> torch.Tensor:
    """One scikit-image photograph as [3, H, W] float in [0, 1]."""
    import skimage.data

    if name.startswith("motorcycle_"):  # the two views of skimage.data.stereo_motorcycle()
        arr = np.asarray(skimage.data.stereo_motorcycle()[("left", "right").index(name[11:])])
    else:
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


def write_scaled_copies(folder: str | Path, scales: list[float]) -> list[Path]:
    """Area-downscaled copies ``<name>_x<scale>.png`` of the training photographs in ``folder``
    for every scale below 1 (scale 1 is the photograph itself, already there)."""
    out = []
    for scale in scales:
        if not 0 < scale <= 1:
            raise ValueError(f"--scales: {scale} is not in (0, 1]; give factors like 1 0.5 0.25")
        if scale == 1:
            continue
        for name in TRAIN_PHOTOS:
            path = Path(folder) / f"{name}_x{scale:g}.png"
            if not path.exists():
                img = sample_photo(name)
                size = [max(1, round(n * scale)) for n in img.shape[-2:]]
                small = torch.nn.functional.interpolate(img[None], size=size, mode="area")[0]
                save_image(small.clamp(0, 1), path)
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bir.data.samples", description=__doc__)
    ap.add_argument(
        "root", nargs="?", default="data/samples", help="writes ROOT/train, ROOT/holdout"
    )
    ap.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="training copies at these scales (1 = as shipped)",
    )
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        folders = materialize_samples(a.root)
        write_scaled_copies(folders["train"], a.scales)
    except ValueError as err:
        ap.exit(2, f"error: {err}\n")
    for split, folder in folders.items():
        n = len(list(folder.glob("*.png")))
        print(f"{split}: {n} images in {folder}")
        assert read_image(next(folder.glob("*.png"))).shape[0] == 3


if __name__ == "__main__":
    main()

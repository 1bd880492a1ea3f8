"""Image datasets: folders, file lists, paired GT/LQ folders and restore inputs.

Every item is a dict (docs/contracts.md): ``gt`` and/or ``lq`` ([3, H, W] float in [0, 1]),
``name`` (path relative to the root, without suffix) and ``index`` (position in the dataset; seeds
derive from it). A file that cannot be decoded is skipped with one warning naming it and counted
in ``dataset.skipped``; another image is returned in its place, so an epoch never crashes on a
corrupt file. An empty or missing folder is an error at construction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bir.data.io import (
    IMAGE_SUFFIXES,
    FolderError,
    ImageReadError,
    image_name,
    index_by_name,
    list_images,
    read_image,
)
from bir.data.samples import materialize_samples
from bir.random import sample_generators

log = logging.getLogger(__name__)

#: generator stream (bir.random) of the crops and flips of training images
AUGMENT_STREAM = 51  # apart from every stream the training modules use


def _stem(path: Path, root: Path) -> str:
    return image_name(path, root)


def _fit_to_crop(img: torch.Tensor, size: int, small: str) -> torch.Tensor:
    """Make both sides >= size: reflect-pad (``small="reflect"``) or upscale (``"upscale"``)."""
    _, h, w = img.shape
    if h >= size and w >= size:
        return img
    if small == "upscale":
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        return F.interpolate(img[None], (nh, nw), mode="bicubic", align_corners=False)[0].clamp(
            0, 1
        )
    if small != "reflect":
        raise ValueError(f"small must be 'reflect' or 'upscale', got {small!r}")
    ph, pw = max(0, size - h), max(0, size - w)
    # reflect padding needs pad < dim; repeat until big enough for tiny images
    while ph > 0 or pw > 0:
        _, h, w = img.shape
        sh, sw = min(ph, h - 1), min(pw, w - 1)
        mode = "reflect" if h > 1 and w > 1 else "replicate"
        img = F.pad(img[None], (0, max(sw, 0), 0, max(sh, 0)), mode=mode)[0]
        if mode == "replicate":
            img = F.pad(img[None], (0, pw, 0, ph), mode="replicate")[0]
            break
        ph, pw = ph - sh, pw - sw
    return img


class ImageFolderDataset(Dataset):
    """Images under a folder (recursively) or from a file list, with crops and flips.

    Item ``index`` is the draw's number: ``index % len(files)`` picks the file, and the random
    crop and flips of that draw come from a generator seeded by ``(seed, index)``
    (:func:`bir.random.sample_generators`, stream :data:`AUGMENT_STREAM`), never from the global
    RNG. A sampler that numbers its draws past ``len(self)`` (as
    :class:`bir.data.datamodule.ResumableSampler` does, one block of ``len(self)`` per pass) thus
    gets fresh crops in every pass, and the same draw always gives the same crop, so a resumed
    run reads exactly the crops an uninterrupted one read.

    Args:
        root: image folder (searched recursively unless ``recursive`` is False).
        file_list: optional text file with one path per line (relative to ``root`` or absolute);
            replaces the folder scan. Lines starting with ``#`` are ignored.
        crop_size: output crop size; None keeps the whole image.
        crop: ``"random"`` (training) or ``"center"`` (evaluation).
        flip: random horizontal flip (and vertical when ``vflip``) — training augmentation.
        small: images smaller than the crop are ``"reflect"``-padded or ``"upscale"``-d.
        repeat: virtual length multiplier (a small folder yields more crops per epoch).
        key: dict key of the image (``"gt"`` for training data).
        seed: run seed of the crop and flip generators (the entry config's ``seed``).
        cache: keep every decoded image in memory (per loader process) after its first read: for
            small folders of large photographs, where decoding dominates a training step.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        file_list: str | os.PathLike | None = None,
        recursive: bool = True,
        crop_size: int | None = None,
        crop: str = "random",
        flip: bool = False,
        vflip: bool = False,
        small: str = "reflect",
        repeat: int = 1,
        key: str = "gt",
        seed: int = 0,
        cache: bool = False,
    ):
        self.root = Path(root)
        if file_list is not None:
            self.files = self._read_file_list(Path(file_list))
        else:
            self.files = list_images(self.root, recursive=recursive)
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.crop_size, self.crop, self.flip, self.vflip = crop_size, crop, flip, vflip
        self.small, self.repeat, self.key = small, int(repeat), key
        self.seed = int(seed)
        self.skipped: set[str] = set()
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def _read_file_list(self, list_path: Path) -> list[Path]:
        if not list_path.is_file():
            raise FileNotFoundError(f"file list does not exist: {list_path}")
        files = []
        for line in list_path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            files.append(p if p.is_absolute() else self.root / p)
        if not files:
            raise ValueError(f"file list {list_path} names no image")
        return files

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def name_of(self, i: int) -> str:
        path = self.files[i % len(self.files)]
        try:
            return _stem(path, self.root)
        except ValueError:  # absolute path outside root (file lists)
            return path.stem

    def load(self, i: int) -> torch.Tensor:
        """Decode file ``i``; on failure skip it (one warning) and fall back to the next file."""
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            path = self.files[j]
            if str(path) in self.skipped:
                continue
            if self.cache is not None and j in self.cache:
                return self.cache[j]
            try:
                img = read_image(path)
                if self.cache is not None:
                    self.cache[j] = img
                return img
            except ImageReadError as err:
                self.skipped.add(str(path))
                log.warning(
                    "skipping unreadable image (%d skipped so far): %s", len(self.skipped), err
                )
        raise RuntimeError(f"no readable image in {self.root} ({len(self.skipped)} unreadable)")

    def _crop(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.crop_size is None:
            return img
        s = self.crop_size
        img = _fit_to_crop(img, s, self.small)
        _, h, w = img.shape
        if self.crop == "center":
            top, left = (h - s) // 2, (w - s) // 2
        else:
            top = int(torch.randint(0, h - s + 1, (), generator=g))
            left = int(torch.randint(0, w - s + 1, (), generator=g))
        return img[:, top : top + s, left : left + s]

    def _augment(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # both coins are always tossed, so a flag does not shift the other draws
        hflip, vflip = (torch.rand(2, generator=g) < 0.5).tolist()
        if self.flip and hflip:
            img = img.flip(-1)
        if self.vflip and vflip:
            img = img.flip(-2)
        return img

    def __getitem__(self, index: int) -> dict:
        i = index % len(self.files)
        g = sample_generators(self.seed, [index], "cpu", AUGMENT_STREAM)[0]
        img = self._augment(self._crop(self.load(i), g), g)
        # a cached image is never handed out: a consumer may write into its batch
        img = img.clone() if self.cache is not None else img.contiguous()
        return {self.key: img, "name": self.name_of(i), "index": index}


class SamplePhotos(ImageFolderDataset):
    """The scikit-image photographs (``split="train"`` or ``"holdout"``), materialised under
    ``root`` on first use; otherwise an :class:`ImageFolderDataset`."""

    def __init__(self, root: str | os.PathLike, split: str = "train", **kwargs):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        folders = materialize_samples(root)
        super().__init__(folders[split], **kwargs)


class PairedFolderDataset(Dataset):
    """GT/LQ pairs matched by relative path without suffix (``a/b.png`` ~ ``a/b.jpg``).

    Unmatched files are listed in one warning; no pair at all is an error, and so are the same
    folder for both and two files of one name in a folder (``dup.jpg``, ``dup.png``: which LQ
    belongs to the GT would be a guess; :func:`bir.data.io.index_by_name`). Optional centre crop
    of the GT (and the LQ at ``crop_size / scale``) for fixed-size validation batches.
    """

    def __init__(
        self,
        gt_root: str | os.PathLike,
        lq_root: str | os.PathLike,
        crop_size: int | None = None,
        scale: int = 1,
    ):
        self.gt_root, self.lq_root = Path(gt_root), Path(lq_root)
        if self.gt_root.resolve() == self.lq_root.resolve():
            raise FolderError(
                f"GT and LQ are the same folder ({gt_root}): every image would be paired with "
                "itself; give the folder of degraded images as LQ"
            )
        gt, lq = index_by_name(self.gt_root), index_by_name(self.lq_root)
        self.names = sorted(set(gt) & set(lq))
        unmatched = sorted(set(gt) ^ set(lq))
        if unmatched:
            log.warning(
                "%d files without a partner in %s / %s: %s",
                len(unmatched),
                self.gt_root,
                self.lq_root,
                ", ".join(unmatched[:10]),
            )
        if not self.names:
            raise ValueError(
                f"no GT/LQ pairs with matching names in {self.gt_root} and {self.lq_root}"
            )
        self.gt, self.lq = gt, lq
        self.crop_size, self.scale = crop_size, scale
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        n = len(self.names)
        for k in range(n):
            name = self.names[(index + k) % n]
            try:
                gt, lq = read_image(self.gt[name]), read_image(self.lq[name])
                break
            except ImageReadError as err:
                self.skipped.add(name)
                log.warning("skipping unreadable pair %s: %s", name, err)
        else:
            raise RuntimeError("no readable GT/LQ pair")
        if self.crop_size is not None:
            s, r = self.crop_size, self.crop_size // self.scale
            _, h, w = gt.shape
            top, left = (h - s) // 2, (w - s) // 2
            gt = gt[:, top : top + s, left : left + s]
            t2, l2 = top // self.scale, left // self.scale
            lq = lq[:, t2 : t2 + r, l2 : l2 + r]
        return {"gt": gt, "lq": lq, "name": name, "index": index}


class RestoreFolderDataset(Dataset):
    """Inputs of ``bir-restore``: every image under ``input`` (recursive), optionally with the
    ground truth of the same name under ``gt`` (for metrics), minus names in ``exclude`` (images
    already restored: a resumed run does not redo them).

    Two inputs (or two ground truths) of one name (``dup.jpg``, ``dup.png``) are an error at
    construction that lists them: both would be restored to ``dup.png``. Unreadable inputs are
    not replaced (each output name must be the input's): those found at construction (a header
    check) are dropped with one warning each and listed in ``skipped`` (paths) and ``unreadable`` (name ->
    reason); one that fails to decode
    later (a truncated JPEG passes the header check; an unreadable ground truth) gives an item
    ``{"name", "index", "unreadable": message}`` with no image, after one warning naming the
    file. :func:`collate` moves such items to ``batch["unreadable"]`` and the
    :class:`~bir.callbacks.PredictionWriter` counts them, so the run goes on.
    """

    def __init__(
        self,
        input: str | os.PathLike,
        gt: str | os.PathLike | None = None,
        exclude: Sequence[str] = (),
        recursive: bool = True,
        validate: bool = True,
    ):
        self.root = Path(input)
        index = index_by_name(self.root, recursive=recursive)
        self.gt_root = Path(gt) if gt else None
        self.gt_index = index_by_name(self.gt_root) if self.gt_root else {}
        excluded = set(exclude)
        self.all_names = list(index)
        self.skipped: list[str] = []
        self.unreadable: dict[str, str] = {}  # name -> reason, for inputs dropped here
        self.items: list[tuple[str, Path]] = []
        for name, path in index.items():
            if name in excluded:
                continue
            if validate:
                try:
                    from PIL import Image

                    with Image.open(path) as im:
                        im.verify()
                except Exception as err:
                    try:  # formats PIL cannot verify may still decode through OpenCV
                        read_image(path)
                    except ImageReadError:
                        self.skipped.append(str(path))
                        self.unreadable[name] = f"cannot read image {path}: {err}"
                        log.warning("skipping unreadable input %s: %s", path, err)
                        continue
            self.items.append((name, path))
        # the global index is the position among *all* inputs, so seeds survive a resume
        self.global_index = {n: i for i, n in enumerate(self.all_names)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        name, path = self.items[index]
        item: dict = {"name": name, "index": self.global_index[name]}
        try:
            item["lq"] = read_image(path)
            if name in self.gt_index:
                item["gt"] = read_image(self.gt_index[name])
        except ImageReadError as err:
            log.warning("skipping %s: %s", name, err)
            return {"name": name, "index": item["index"], "unreadable": str(err)}
        return item


def collate(items: list[dict]) -> dict:
    """Stack tensors (same sizes required within a batch) and keep strings/ints as lists/tensors.

    Items that carry ``unreadable`` (an image that failed to decode, see
    :class:`RestoreFolderDataset`) leave the batch: their ``(name, message)`` pairs go to
    ``batch["unreadable"]``. A batch of unreadable items only is ``{"name": [], "index": empty,
    "unreadable": [...]}``; the prediction writer skips its predict step.
    """
    unreadable = [(it["name"], it["unreadable"]) for it in items if "unreadable" in it]
    if unreadable:
        items = [it for it in items if "unreadable" not in it]
        if not items:
            return {"name": [], "index": torch.zeros(0, dtype=torch.long), "unreadable": unreadable}
    out: dict = {} if not unreadable else {"unreadable": unreadable}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"images of different sizes in one batch ({sorted(shapes)}); use batch_size=1 "
                    "or a crop_size for this dataset"
                )
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolderDataset",
    "PairedFolderDataset",
    "RestoreFolderDataset",
    "SamplePhotos",
    "collate",
]

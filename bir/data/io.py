"""Robust image reading and atomic image writing.

Tensors are float32 CHW RGB in [0, 1]. Reading handles grayscale, RGBA (composited on white),
16-bit PNG/TIFF and EXIF orientation; anything unreadable raises :class:`ImageReadError` naming
the file, so callers can skip it with one warning instead of crashing mid-epoch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(RuntimeError):
    """An image file could not be decoded; the message names the file and the reason."""


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``root`` (by suffix, case-insensitive).

    Raises ``FileNotFoundError`` if ``root`` does not exist and ``ValueError`` if it holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if root.is_file():
        raise NotADirectoryError(f"expected a folder of images, got a file: {root}")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ValueError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}"
            + (" (searched recursively)" if recursive else "")
        )
    return files


def _to_float_rgb(arr: np.ndarray) -> np.ndarray:
    """HxW / HxWxC integer or float array -> HxWx3 float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    elif arr.dtype in (np.int32, np.int64):  # PIL mode "I" (16-bit PNG read as int32)
        maxv = 65535.0 if arr.max() > 255 else 255.0
        out = arr.astype(np.float32) / maxv
    elif arr.dtype == bool:
        out = arr.astype(np.float32)
    else:
        out = arr.astype(np.float32)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 4:  # composite RGBA on white
        alpha = out[:, :, 3:4]
        out = out[:, :, :3] * alpha + (1.0 - alpha)
    elif out.shape[2] == 2:  # gray + alpha
        alpha = out[:, :, 1:2]
        out = np.repeat(out[:, :, :1] * alpha + (1.0 - alpha), 3, axis=2)
    elif out.shape[2] != 3:
        raise ValueError(f"unsupported channel count {out.shape[2]}")
    return np.clip(out, 0.0, 1.0)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a float32 tensor [3, H, W] in [0, 1], RGB, EXIF orientation applied.

    PNG and TIFF go through OpenCV first (PIL cannot hold 16-bit colour); other formats through
    PIL, which applies the EXIF orientation. Each falls back to the other decoder.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"cannot read image {path}: no such file")
    arr, err = None, None
    readers = (_read_with_cv2, _read_with_pil)
    if path.suffix.lower() not in (".png", ".tif", ".tiff"):
        readers = readers[::-1]
    for reader in readers:
        try:
            arr = reader(path)
        except Exception as e:  # decoders raise many types for corrupt data
            err = e
            arr = None
        if arr is not None:
            break
    if arr is None:
        raise ImageReadError(f"cannot read image {path}: {err or 'not a decodable image'}")
    try:
        out = _to_float_rgb(arr)
    except ValueError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if out.shape[0] == 0 or out.shape[1] == 0:
        raise ImageReadError(f"cannot read image {path}: empty image")
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _read_with_pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        elif im.mode in ("I;16", "I;16B", "I;16L"):
            im = im.convert("I")
        return np.array(im)


def _read_with_cv2(path: Path) -> np.ndarray | None:
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        return None
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    return arr


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] (or [1, H, W]) float in [0, 1] -> HxWx3 uint8, rounded. NaNs are an error."""
    if img.ndim != 3:
        raise ValueError(f"expected a [C, H, W] image, got shape {tuple(img.shape)}")
    if not torch.isfinite(img).all():
        raise ValueError("image contains NaN or infinite values; refusing to write it")
    arr = img.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(1, 2, 0)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_image(img: torch.Tensor, path: str | os.PathLike) -> None:
    """Save [3, H, W] in [0, 1] atomically (temp file + os.replace); format from the suffix."""
    import io

    path = Path(path)
    fmt = {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".bmp": "BMP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".webp": "WEBP",
    }.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported image suffix for {path}")
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(to_uint8(img)).save(buf, format=fmt, **kwargs)
    atomic_write_bytes(path, buf.getvalue())

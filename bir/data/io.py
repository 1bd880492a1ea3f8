"""Robust image reading, atomic writing, and the folder checks every command runs first.

Tensors are float32 CHW RGB in [0, 1]. Reading handles grayscale, RGBA (composited on white),
16-bit PNG/TIFF/PNM (scaled by the declared depth), EXIF orientation in every format and the
first frame of animated GIFs; anything unreadable, or holding NaN/inf, raises
:class:`ImageReadError` naming the file, so callers can skip it with one warning instead of
crashing mid-run.

Folder rules (shared by ``bir-restore``, ``bir-degrade``, the paired dataset and ``bir-eval``):
an output folder is never equal to, inside, or around an input folder; two files whose names
differ only by suffix are an error listing the collisions; hidden files are never inputs; an
output folder that cannot be written fails before any work (:class:`FolderError`).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from bir.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".gif",
)

#: EXIF tag of the orientation (1 = as stored; 2-8 = flips and rotations, TIFF/EXIF 2.3).
_EXIF_ORIENTATION = 0x0112

#: Temporary files of :func:`atomic_write_bytes`: ``.<final name>.<8 random chars>.tmp``.
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

_warned_animated: set[str] = set()


class ImageReadError(RuntimeError):
    """An image file could not be decoded; the message names the file and the reason."""


class FolderError(UsageError):
    """A folder bir refuses to work with (missing, empty, overlapping input and output, an output
    that cannot be written, file names that would collide). The message is one line: what is
    wrong and what to change; the entry points print it without a traceback."""


class MissingFolderError(FolderError, FileNotFoundError):
    """A folder that should hold images does not exist."""


class NotAFolderError(FolderError, NotADirectoryError):
    """A path that should be a folder of images is a file."""


class DuplicateNameError(FolderError):
    """Two or more files in one folder share a name without suffix (``dup.jpg``, ``dup.png``)."""


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``root`` (by suffix, case-insensitive).

    Hidden files and folders (a name starting with ``.``, e.g. the temporary files of an
    interrupted write) are never images. Symbolic links to files and folders are followed; a link
    back to a folder already visited (a loop, or a second link to the same folder) is skipped
    with a warning, so every file is listed once. Files with other suffixes are counted in one
    log line.

    Raises :class:`MissingFolderError` (a ``FileNotFoundError``) if ``root`` does not exist,
    :class:`NotAFolderError` if it is a file and :class:`FolderError` (a ``ValueError``) if it
    holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise MissingFolderError(f"image folder does not exist: {root}")
    if root.is_file():
        raise NotAFolderError(f"expected a folder of images, got a file: {root}")
    files: list[Path] = []
    other: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                log.warning(
                    "not listing %s: the same folder was already listed (symbolic link)", folder
                )
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            log.warning("cannot list folder %s: %s", folder, err.strerror or err)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                if recursive:
                    subfolders.append(path)
            elif entry.is_file(follow_symlinks=True):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                else:
                    kind = path.suffix.lower() or "(no suffix)"
                    other[kind] = other.get(kind, 0) + 1
            elif entry.is_symlink():
                log.warning("skipping broken symbolic link %s", path)
        stack.extend(reversed(subfolders))  # depth first, in name order
    if other:
        log.info(
            "%s: ignored %d files that are not images (%s)",
            root,
            sum(other.values()),
            ", ".join(f"{k}: {v}" for k, v in sorted(other.items())),
        )
    if not files:
        raise FolderError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}"
            + (" (searched recursively)" if recursive else "")
        )
    return sorted(files)


def image_name(path: Path, root: Path) -> str:
    """The name bir gives an image: its path relative to ``root`` without suffix, "/"-separated
    (``root/sub/a.jpg`` -> ``sub/a``). Outputs, records and pairings use it."""
    return path.relative_to(root).with_suffix("").as_posix()


def index_by_name(root: str | os.PathLike, recursive: bool = True) -> dict[str, Path]:
    """Image files under ``root`` by :func:`image_name`.

    Two files with one name (``dup.jpg`` and ``dup.png``) would be restored, degraded or paired
    under one name, the second silently replacing the first; so they are an error listing every
    collision (:class:`DuplicateNameError`), before any work.
    """
    root = Path(root)
    index: dict[str, list[Path]] = {}
    for p in list_images(root, recursive=recursive):
        index.setdefault(image_name(p, root), []).append(p)
    clashes = {n: ps for n, ps in index.items() if len(ps) > 1}
    if clashes:
        shown = "; ".join(
            f"{n} ({', '.join(p.name for p in ps)})" for n, ps in list(clashes.items())[:10]
        )
        more = f" and {len(clashes) - 10} more" if len(clashes) > 10 else ""
        n = len(clashes)
        raise DuplicateNameError(
            f"{n} {'name' if n == 1 else 'names'} in {root} {'is' if n == 1 else 'are'} used by "
            f"more than one file: {shown}{more}. "
            "Outputs are named by path without suffix, so rename or move all but one of each"
        )
    return {n: ps[0] for n, ps in index.items()}


# -- folders a command reads and writes --------------------------------------------------------
def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is the same folder as"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_separate_folders(output: str | os.PathLike, **inputs: str | os.PathLike | None) -> None:
    """Refuse an output folder equal to, inside, or containing an input folder.

    Equal: outputs overwrite the originals (``a.png`` restored onto ``a.png``), and a resumed run
    takes every input for done. Output inside input: each run reads the previous outputs back as
    inputs (``in/out/out/...``). Input inside output: the output's listing holds the inputs.
    Paths are compared after resolving symbolic links. ``inputs`` maps the option name (shown in
    the message) to its folder; None entries are ignored.
    """
    out = Path(output).expanduser().resolve()
    for key, folder in inputs.items():
        if folder is None:
            continue
        how = _overlap(out, Path(folder).expanduser().resolve())
        if how:
            raise FolderError(
                f"output={output} {how} {key}={folder}: bir never writes where it reads, so "
                "inputs would be overwritten or read back as inputs. Choose an output folder "
                f"outside {key} (e.g. a sibling folder)"
            )


def check_writable_folder(folder: str | os.PathLike, key: str = "output") -> Path:
    """Create ``folder`` (with parents) and prove it is writable with a temporary file.

    Raises :class:`FolderError` if it is a file, cannot be created or cannot be written, so a
    command fails before any work rather than after the first image.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{key}={folder} is a file, not a folder; choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bir-write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise FolderError(
            f"cannot write to {key}={folder} ({err.strerror or err}); make it writable or choose "
            "another folder"
        ) from None
    return folder


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that an interrupted :func:`atomic_write_bytes` left under
    ``folder`` (``.<name>.<8 chars>.tmp``); returns them. Call it before a run starts writing,
    never while one writes to the same folder."""
    removed = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if _TEMP_FILE.match(name):
                path = Path(dirpath) / name
                try:
                    path.unlink()
                    removed.append(path)
                except FileNotFoundError:
                    pass
    if removed:
        log.info(
            "removed %d temporary files left by an interrupted run in %s", len(removed), folder
        )
    return removed


def prepare_output_folder(output: str | os.PathLike, **inputs: str | os.PathLike | None) -> Path:
    """Everything a folder-to-folder command checks before any work: the output is apart from
    every input (:func:`check_separate_folders`), exists and is writable
    (:func:`check_writable_folder`), and holds no temporary file from an interrupted run."""
    check_separate_folders(output, **inputs)
    folder = check_writable_folder(output)
    remove_stale_temp_files(folder)
    return folder


def check_restore_folders(
    input: str | os.PathLike | None,
    output: str | os.PathLike | None,
    gt: str | os.PathLike | None = None,
) -> Path:
    """The checks ``bir-restore`` runs before it builds anything: ``input`` and ``output`` set,
    ``input`` (and ``gt``) an existing folder, then :func:`prepare_output_folder`. Unset values
    are None (``cfg.get("input")`` of a missing ``???``)."""
    unset = [k for k, v in (("input", input), ("output", output)) if v in (None, "", "???")]
    if unset:
        raise FolderError(
            "bir-restore needs " + " and ".join(f"{k}=DIR" for k in unset) + " (input: the "
            "folder of images to restore, output: where the restored images go)"
        )
    for key, folder in (("input", input), ("gt", gt)):
        if folder is not None and not Path(folder).is_dir():
            if Path(folder).exists():
                raise NotAFolderError(f"{key}={folder} is a file, not a folder; give the folder")
            raise MissingFolderError(f"{key}={folder} does not exist; give an existing folder")
    return prepare_output_folder(output, input=input, gt=gt)


# -- reading -----------------------------------------------------------------------------------
def _to_float_rgb(arr: np.ndarray, peak: float | None = None) -> np.ndarray:
    """HxW / HxWxC integer or float array -> HxWx3 float32 in [0, 1].

    Integers are divided by ``peak``, the file's declared maximum (PNM ``maxval``); by default
    the full range of the sample type (255, 65535; PIL's 32-bit "I" mode holds 16-bit samples).
    The depth is never guessed from the pixel values. Non-finite floats are an error.
    """
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("it contains NaN or infinite values")
    if peak is None:
        peak = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype)
        if peak is None and arr.dtype.kind in "iu":
            peak = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(arr.dtype).max)
    out = arr.astype(np.float32)
    if peak is not None and arr.dtype != bool:
        out = out / np.float32(peak)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 4:  # composite RGBA on white
        alpha = out[:, :, 3:4]
        out = out[:, :, :3] * alpha + (1.0 - alpha)
    elif out.shape[2] == 2:  # gray + alpha
        alpha = out[:, :, 1:2]
        out = np.repeat(out[:, :, :1] * alpha + (1.0 - alpha), 3, axis=2)
    elif out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] != 3:
        raise ValueError(f"unsupported channel count {out.shape[2]}")
    return np.clip(out, 0.0, 1.0)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a float32 tensor [3, H, W] in [0, 1], RGB, EXIF orientation applied.

    PNG and TIFF go through OpenCV first (PIL cannot hold 16-bit colour); other formats through
    PIL. Each falls back to the other decoder. Every format gets its EXIF orientation (OpenCV
    applies it only to TIFF; for the others it is read with PIL and applied here). Integer
    samples are scaled by the file's declared depth; an animated GIF gives its first frame (one
    warning per file). NaN or infinite samples (float TIFF) are refused: an error, not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"cannot read image {path}: no such file")
    decoded, err = None, None
    readers = (_read_with_cv2, _read_with_pil)
    if path.suffix.lower() not in (".png", ".tif", ".tiff"):
        readers = readers[::-1]
    for reader in readers:
        try:
            decoded = reader(path)
        except Exception as e:  # decoders raise many types for corrupt data
            err = e
            decoded = None
        if decoded is not None:
            break
    if decoded is None:
        raise ImageReadError(f"cannot read image {path}: {err or 'not a decodable image'}")
    try:
        out = _to_float_rgb(*decoded)
    except ValueError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if out.shape[0] == 0 or out.shape[1] == 0:
        raise ImageReadError(f"cannot read image {path}: empty image")
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _read_with_pil(path: Path) -> tuple[np.ndarray, float | None]:
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and str(path) not in _warned_animated:
            _warned_animated.add(str(path))
            log.warning("%s is animated (%d frames); reading its first frame only", path, frames)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        elif im.mode.startswith("I;16"):
            im = im.convert("I")
        # PIL scales PNM samples to 8 or 16 bits from their maxval, and holds 16-bit samples in
        # mode "I": so "I" means a 65535 peak, whatever the largest pixel value is.
        return np.array(im), 65535.0 if im.mode == "I" else None


def _exif_orientation(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # no EXIF, or a format PIL cannot open: as stored
        return 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1-8 to an HxW(xC) array as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:  # transpose
        return arr.swapaxes(0, 1)
    if orientation == 6:  # 90 degrees clockwise
        return np.rot90(arr, k=-1)
    if orientation == 7:  # transverse
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:  # 90 degrees anticlockwise
        return np.rot90(arr, k=1)
    return arr


def _pnm_maxval(data: bytes) -> int | None:
    """The declared maxval of a binary or ASCII PGM/PPM header (None for bitmaps / not PNM)."""
    if data[:2] not in (b"P2", b"P3", b"P5", b"P6"):
        return None
    tokens: list[bytes] = []
    for line in data[2:1024].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 3:
            return int(tokens[2])
    return None


def _read_with_cv2(path: Path) -> tuple[np.ndarray, float | None] | None:
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
    if path.suffix.lower() not in (".tif", ".tiff"):  # OpenCV orients TIFF itself
        arr = _orient(arr, _exif_orientation(path))
    return arr, _pnm_maxval(data[:1024].tobytes())


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


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file gets the mode a plain ``open(path, "w")`` would give (0o666 minus the umask: 0644
    with the usual umask 022), not the 0600 of ``mkstemp``. A killed write leaves a hidden
    ``.<name>.<8 chars>.tmp`` that :func:`remove_stale_temp_files` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
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

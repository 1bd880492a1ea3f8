"""bir.data.io safety rules: folders a command refuses, file modes, hidden and temporary files,
symbolic links, name collisions, and reads that must not be silently wrong (issue 14)."""

from __future__ import annotations

import logging
import os
import stat
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from bir.data import io as bio
from bir.data.io import (
    DuplicateNameError,
    FolderError,
    ImageReadError,
    MissingFolderError,
    atomic_write_bytes,
    check_restore_folders,
    check_separate_folders,
    check_writable_folder,
    index_by_name,
    list_images,
    read_image,
    remove_stale_temp_files,
    save_image,
)
from bir.errors import UsageError


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _img(path, value=0.5, size=(3, 8, 8)):
    save_image(torch.full(size, value), path)


# -- files bir writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_bytes(tmp_path / "r.json", b"{}")
    _img(tmp_path / "a.png")
    # the mode a plain open() gives, as for Lightning checkpoints and Hydra logs
    with open(tmp_path / "plain.txt", "w"):
        pass
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~mask
    for name in ("r.json", "a.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    sub = tmp_path / "records" / "sub"
    sub.mkdir(parents=True)
    # exactly what atomic_write_bytes creates before a SIGKILL would stop it
    fd, left = tempfile.mkstemp(prefix=".a.png.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    fd, left2 = tempfile.mkstemp(prefix=".b.json.", suffix=".tmp", dir=sub)
    os.close(fd)
    keep = [tmp_path / "a.png", tmp_path / ".user-notes.tmp", sub / "b.json"]
    for p in keep:
        p.write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(map(str, removed)) == sorted([left, left2])
    assert all(p.exists() for p in keep)
    assert not os.path.exists(left) and not os.path.exists(left2)


# -- folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "output, how",
    [("in", "is the same folder as"), ("in/restored", "is inside"), (".", "contains")],
)
def test_output_overlapping_an_input_is_refused(tmp_path, output, how):
    (tmp_path / "in").mkdir()
    with pytest.raises(FolderError) as err:
        check_separate_folders(tmp_path / output, input=tmp_path / "in")
    msg = str(err.value)
    assert how in msg and "input=" in msg and "\n" not in msg
    assert isinstance(err.value, UsageError)  # printed as one line, exit 2, by the entry points
    check_separate_folders(tmp_path / "out", input=tmp_path / "in", gt=None)  # siblings: fine


def test_overlap_is_seen_through_symbolic_links(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    with pytest.raises(FolderError, match="same folder"):
        check_separate_folders(tmp_path / "alias", input=tmp_path / "in")
    with pytest.raises(FolderError, match="gt="):
        check_separate_folders(tmp_path / "in" / "x", input=tmp_path / "other", gt=tmp_path / "in")


def test_unwritable_output_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="is a file"):
        check_writable_folder(tmp_path / "file")
    with pytest.raises(FolderError, match="cannot write"):
        check_writable_folder(tmp_path / "file" / "sub")  # its parent is a file
    if os.geteuid() != 0:  # root writes to read-only folders: simulate below instead
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(FolderError, match="cannot write"):
            check_writable_folder(ro)
        ro.chmod(0o755)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(FolderError, match="Permission denied"):
        check_writable_folder(tmp_path / "ok")
    monkeypatch.undo()
    assert check_writable_folder(tmp_path / "new" / "deep").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe is gone


def test_restore_folder_checks(tmp_path):
    with pytest.raises(FolderError, match=r"input=DIR and output=DIR"):
        check_restore_folders(None, None)
    with pytest.raises(FolderError, match=r"needs output=DIR"):
        check_restore_folders(tmp_path, None)
    with pytest.raises(MissingFolderError, match="does not exist"):
        check_restore_folders(tmp_path / "nope", tmp_path / "out")
    _img(tmp_path / "in" / "a.png")
    with pytest.raises(FolderError, match="same folder"):
        check_restore_folders(tmp_path / "in", tmp_path / "in")
    with pytest.raises(FolderError, match="gt="):
        check_restore_folders(tmp_path / "in", tmp_path / "gt", gt=tmp_path / "gt")
    fd, stale = tempfile.mkstemp(prefix=".a.png.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    with pytest.raises(FolderError, match="contains input="):
        check_restore_folders(tmp_path / "in", tmp_path)  # output around the input
    assert os.path.exists(stale)  # refused before touching anything


def test_restore_folder_checks_prepare_a_good_output(tmp_path):
    _img(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    fd, stale = tempfile.mkstemp(prefix=".a.png.", suffix=".tmp", dir=tmp_path / "out")
    os.close(fd)
    assert check_restore_folders(tmp_path / "in", tmp_path / "out") == tmp_path / "out"
    assert not os.path.exists(stale)


# -- listing ------------------------------------------------------------------------------------
def test_hidden_files_and_folders_are_never_inputs(tmp_path):
    for rel in ("a.png", ".a.png", ".thumbs/b.png", "sub/.c.png", "sub/c.png"):
        _img(tmp_path / rel)
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.png", "sub/c.png"]


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path, caplog):
    real = tmp_path / "elsewhere"
    _img(real / "x.png")
    _img(real / "deep" / "y.png")
    root = tmp_path / "root"
    _img(root / "a.png")
    (root / "linked").symlink_to(real, target_is_directory=True)
    (real / "deep" / "back").symlink_to(real, target_is_directory=True)  # a loop
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    with caplog.at_level(logging.WARNING, logger="bir.data.io"):
        names = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert names == ["a.png", "linked/deep/y.png", "linked/x.png"]
    text = caplog.text
    assert "back" in text and "already listed" in text
    assert "dangling.png" in text


def test_duplicate_names_are_an_error_listing_them(tmp_path):
    for rel in ("dup.jpg", "dup.png", "sub/x.png", "sub/x.bmp", "ok.png"):
        _img(tmp_path / rel)
    with pytest.raises(DuplicateNameError) as err:
        index_by_name(tmp_path)
    msg = str(err.value)
    assert msg.startswith("2 names")
    assert "dup (dup.jpg, dup.png)" in msg and "sub/x (x.bmp, x.png)" in msg
    assert "ok" not in msg.replace("rename", "")
    (tmp_path / "dup.jpg").unlink()
    (tmp_path / "sub" / "x.bmp").unlink()
    idx = index_by_name(tmp_path)
    assert {k: v.name for k, v in idx.items()} == {
        "dup": "dup.png",
        "ok": "ok.png",
        "sub/x": "x.png",
    }


def test_dotted_names_keep_their_dots(tmp_path):
    _img(tmp_path / "a.b.png")
    _img(tmp_path / "a.c.png")
    assert sorted(index_by_name(tmp_path)) == ["a.b", "a.c"]


# -- reads that must not be silently wrong ------------------------------------------------------
def test_nan_and_inf_inputs_are_refused(tmp_path):
    import cv2

    arr = np.full((4, 4), 0.25, np.float32)
    cv2.imwrite(str(tmp_path / "ok.tif"), arr)
    assert torch.allclose(read_image(tmp_path / "ok.tif"), torch.full((3, 4, 4), 0.25))
    for bad in (np.nan, np.inf):
        arr[1, 2] = bad
        cv2.imwrite(str(tmp_path / "bad.tif"), arr)
        with pytest.raises(ImageReadError, match="bad.tif.*NaN or infinite"):
            read_image(tmp_path / "bad.tif")


def _pgm(path, maxval, values, big=None):
    big = maxval > 255 if big is None else big
    data = np.asarray(values, dtype=">u2" if big else np.uint8)
    h, w = data.shape
    path.write_bytes(f"P5\n# made by a test\n{w} {h}\n{maxval}\n".encode() + data.tobytes())


@pytest.mark.parametrize("maxval", [65535, 1000, 4095, 200])
def test_pnm_uses_the_declared_depth(tmp_path, maxval, monkeypatch):
    values = [[0, 100, 200], [50, 150, min(maxval, 199)]]
    _pgm(tmp_path / "g.pgm", maxval, values)
    expected = torch.tensor(values, dtype=torch.float32) / maxval
    img = read_image(tmp_path / "g.pgm")
    assert torch.allclose(img[0], expected, atol=0.5 / 255 if maxval <= 255 else 1e-4)
    # the OpenCV fallback (used when PIL fails) reads the same maxval from the header
    monkeypatch.setattr(bio, "_read_with_pil", lambda p: (_ for _ in ()).throw(OSError("no")))
    img = read_image(tmp_path / "g.pgm")
    assert torch.allclose(img[0], expected, atol=1e-6)


def test_ascii_pgm_header_with_comments():
    assert bio._pnm_maxval(b"P2\n# c\n3 # w\n1\n1000\n0 1 2\n") == 1000
    assert bio._pnm_maxval(b"P4\n3 1\n") is None
    assert bio._pnm_maxval(b"\x89PNG....") is None


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".webp"])
def test_exif_orientation_is_applied_in_every_format(tmp_path, orientation, suffix):
    rng = np.random.default_rng(orientation)
    arr = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)  # 3x5: every transpose is visible
    arr = np.kron(arr, np.ones((8, 8, 1), np.uint8))  # 8x8 blocks survive JPEG
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"r{suffix}"
    im.save(path, exif=exif, **({"quality": 100} if suffix in (".jpg", ".webp") else {}))
    with Image.open(path) as ref:  # reference: PIL's own transpose of the decoded file
        want = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"), np.float32) / 255
    got = read_image(path).permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < (0.05 if suffix in (".jpg", ".webp") else 1e-6)


def test_animated_gif_reads_its_first_frame_with_one_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (6, 4), (0, 255, 0)).save(tmp_path / "still.gif")
    assert [p.name for p in list_images(tmp_path)] == ["anim.gif", "still.gif"]
    with caplog.at_level(logging.WARNING, logger="bir.data.io"):
        img = read_image(tmp_path / "anim.gif")
        read_image(tmp_path / "anim.gif")
        still = read_image(tmp_path / "still.gif")
    assert img[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and img.shape == (3, 4, 6)
    assert still[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    warned = [r.message for r in caplog.records if "anim.gif" in r.message]
    assert len(warned) == 1 and "3 frames" in warned[0] and "first frame" in warned[0]
    assert not any("still.gif" in r.message for r in caplog.records)


# -- datasets ----------------------------------------------------------------------------------
def _truncated_jpeg(path, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:  # the start-up check lets it through
        im.verify()


def test_restore_dataset_refuses_two_inputs_of_one_name(tmp_path):
    from bir.data.datasets import RestoreFolderDataset

    _img(tmp_path / "in" / "dup.jpg")
    _img(tmp_path / "in" / "dup.png")
    _img(tmp_path / "gt" / "a.png")
    with pytest.raises(DuplicateNameError, match=r"dup \(dup.jpg, dup.png\)"):
        RestoreFolderDataset(tmp_path / "in")
    (tmp_path / "in" / "dup.jpg").unlink()
    _img(tmp_path / "gt" / "dup.jpg")
    _img(tmp_path / "gt" / "dup.png")
    with pytest.raises(DuplicateNameError, match=r"1 name in \S+gt is used by more than one"):
        RestoreFolderDataset(tmp_path / "in", gt=tmp_path / "gt")


def test_paired_dataset_refuses_ambiguous_pairs_and_one_folder(tmp_path):
    from bir.data.datasets import PairedFolderDataset

    gt, lq = tmp_path / "gt", tmp_path / "lq"
    _img(gt / "dup.png", 0.5)
    _img(lq / "dup.jpg", 0.1)  # the wrong partner (9 dB) ...
    _img(lq / "dup.png", 0.5)  # ... and the right one (inf dB): which is meant is a guess
    with pytest.raises(DuplicateNameError, match=r"dup \(dup.jpg, dup.png\)"):
        PairedFolderDataset(gt, lq)
    with pytest.raises(FolderError, match="same folder"):
        PairedFolderDataset(gt, tmp_path / "gt" / ".." / "gt")


def test_restore_dataset_skips_an_image_that_fails_during_the_run(tmp_path, caplog):
    from bir.data.datasets import RestoreFolderDataset, collate

    _img(tmp_path / "in" / "a.png", 0.2)
    _truncated_jpeg(tmp_path / "in" / "b.jpg")
    _img(tmp_path / "in" / "c.png", 0.6)
    _img(tmp_path / "gt" / "a.png", 0.2)
    _truncated_jpeg(tmp_path / "gt" / "c.jpg", seed=1)  # a truncated ground truth
    ds = RestoreFolderDataset(tmp_path / "in", gt=tmp_path / "gt")
    assert len(ds) == 3 and ds.skipped == []  # the header check cannot see the truncation
    with caplog.at_level(logging.WARNING, logger="bir.data.datasets"):
        items = [ds[i] for i in range(3)]
    assert [("unreadable" in it) for it in items] == [False, True, True]
    assert "b.jpg" in items[1]["unreadable"] and "c.jpg" in items[2]["unreadable"]
    assert sum("b.jpg" in r.message for r in caplog.records) == 1
    assert sum("c.jpg" in r.message for r in caplog.records) == 1
    batch = collate(items)
    assert batch["name"] == ["a"] and batch["index"].tolist() == [0]
    assert batch["lq"].shape == (1, 3, 8, 8) and batch["gt"].shape == (1, 3, 8, 8)
    assert [n for n, _ in batch["unreadable"]] == ["b", "c"]
    empty = collate(items[1:])
    assert empty["name"] == [] and empty["index"].numel() == 0 and "lq" not in empty
    assert "unreadable" not in collate(items[:1])

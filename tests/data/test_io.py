import numpy as np
import pytest
import torch
from PIL import Image

from bir.data.io import ImageReadError, list_images, read_image, save_image


def test_png_round_trip_is_8bit_exact(tmp_path):
    x = torch.randint(0, 256, (3, 7, 9)).float() / 255
    save_image(x, tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), x)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    g = (np.arange(20, dtype=np.uint8) * 10).reshape(4, 5)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (3, 4, 5)
    assert torch.allclose(img[0], torch.from_numpy(g).float() / 255)
    assert torch.equal(img[0], img[2])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # opaque red; the rest fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert img[:, 1, 1].tolist() == [1.0, 1.0, 1.0]


def test_16bit_png_keeps_precision(tmp_path):
    import cv2

    a = np.array([[0, 1, 65535]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), np.stack([a, a, a], -1))
    img = read_image(tmp_path / "g16.png")
    assert img[0, 0].tolist() == pytest.approx([0.0, 1 / 65535, 1.0])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((2, 4, 3), np.uint8)  # landscape 2x4
    arr[0, 0] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    img = read_image(tmp_path / "r.jpg")
    assert img.shape == (3, 4, 2)  # portrait after transpose


def test_corrupt_and_missing_files_raise_named_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_save_refuses_nan_and_leaves_no_partial_file(tmp_path):
    x = torch.zeros(3, 4, 4)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_image(x, tmp_path / "n.png")
    assert list(tmp_path.iterdir()) == []


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "sub").mkdir()
    save_image(torch.zeros(3, 2, 2), tmp_path / "sub" / "x.PNG")
    assert [p.name for p in list_images(tmp_path)] == ["x.PNG"]
    with pytest.raises(ValueError):
        list_images(tmp_path, recursive=False)

"""DiffJPEG against libjpeg (OpenCV encode/decode) at the same quality."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from bir.degradations import DiffJPEG, quality_scaled_tables
from bir.degradations.filters import crop_from_canvas, pad_to_canvas
from bir.degradations.jpeg import LUMA_QUANT_TABLE


def _photo(h: int = 64, w: int = 64) -> np.ndarray:
    from skimage import data

    return data.astronaut()[100 : 100 + h, 150 : 150 + w]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_quality_tables_follow_libjpeg_scaling():
    luma, chroma = quality_scaled_tables(torch.tensor([50, 100, 10, 75]))
    base = torch.tensor(LUMA_QUANT_TABLE, dtype=torch.float64)
    assert torch.equal(luma[0], base)  # q = 50 -> the base table
    assert torch.equal(luma[1], torch.ones(8, 8, dtype=torch.float64))  # q = 100 -> all ones
    assert torch.equal(luma[2], torch.clamp(torch.floor((base * 500 + 50) / 100), 1, 255))
    assert (
        luma[3, 0, 0] == 8 and chroma[3, 0, 0] == 9
    )  # (16 * 50 + 50) // 100, (17 * 50 + 50) // 100


@pytest.mark.parametrize("quality", [30, 60, 90])
def test_round_trip_close_to_opencv_libjpeg(quality):
    img = _photo(72, 88)  # not a multiple of 16: exercises MCU padding
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    ref = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) / 255
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    ours = DiffJPEG()(x, torch.tensor([quality]))[0].permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape
    assert _psnr(ours, ref) > 38  # same tables and subsampling; float DCT / upsampling differ
    # and the compression error itself is of the same size as libjpeg's
    assert abs(_psnr(ours, img / 255) - _psnr(ref, img / 255)) < 0.5


def test_per_sample_quality_and_no_inplace_modification():
    x = torch.from_numpy(_photo()).permute(2, 0, 1)[None].float().div(255).repeat(3, 1, 1, 1)
    quality = torch.tensor([20.0, 50.0, 95.0])
    x_before, q_before = x.clone(), quality.clone()
    out = DiffJPEG()(x, quality)
    assert torch.equal(x, x_before) and torch.equal(quality, q_before)
    errors = [float((o - x[0]).pow(2).mean()) for o in out]
    assert errors[0] > errors[1] > errors[2]
    alone = DiffJPEG()(x[1:2], quality[1:2])
    torch.testing.assert_close(out[1:2], alone, atol=1e-6, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_differentiable_mode_passes_gradients_and_stays_close():
    x = torch.from_numpy(_photo(32, 32)).permute(2, 0, 1)[None].float().div(255)
    x.requires_grad_(True)
    out = DiffJPEG(differentiable=True)(x, torch.tensor([50]))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    hard = DiffJPEG(differentiable=False)(x.detach(), torch.tensor([50]))
    assert (out.detach() - hard).abs().max() < 0.05
    with torch.no_grad():
        assert DiffJPEG(differentiable=False)(x, torch.tensor([50])).requires_grad is False


def test_ragged_canvas_jpeg_equals_per_image():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, h, w, generator=g) for h, w in [(20, 37), (48, 16), (9, 9)]]
    jpeg = DiffJPEG()
    canvas, sizes = pad_to_canvas(images, multiple=16, replicate_multiple=16)
    batched = crop_from_canvas(jpeg(canvas, torch.tensor([40, 70, 90])), sizes)
    for x, q, y in zip(images, [40, 70, 90], batched):
        torch.testing.assert_close(y, jpeg(x, torch.tensor([q])), atol=1e-5, rtol=0)


def test_basicsr_quality_tables_are_transposed_and_unfloored():
    luma, chroma = quality_scaled_tables(torch.tensor([37.5, 80.0]), convention="basicsr")
    base = torch.tensor(LUMA_QUANT_TABLE, dtype=torch.float64)
    torch.testing.assert_close(luma[0], base.T * (5000 / 37.5) / 100)
    torch.testing.assert_close(luma[1], base.T * 0.4)  # S = 200 - 160 = 40
    assert chroma[1, 0, 0] == pytest.approx(17 * 0.4) and chroma[1, 0, 3] == pytest.approx(47 * 0.4)
    with pytest.raises(ValueError, match="convention"):
        quality_scaled_tables(torch.tensor([50]), convention="pil")


@pytest.mark.parametrize("differentiable", [False, True])
def test_basicsr_convention_equals_basicsr_diffjpeg(differentiable):
    """Random images (sizes not multiples of 16: zero padding), continuous per-sample qualities."""
    basicsr_jpeg = pytest.importorskip("basicsr.utils.diffjpeg")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 40, 72, generator=g)
    quality = torch.rand(4, generator=g) * 65 + 30
    ref = basicsr_jpeg.DiffJPEG(differentiable=differentiable)(x.clone(), quality.clone())
    q_before = quality.clone()
    ours = DiffJPEG(differentiable=differentiable, convention="basicsr")(x, quality)
    assert torch.equal(quality, q_before)  # BasicSR rewrites its quality tensor; bir does not
    torch.testing.assert_close(ours, ref.detach(), atol=2e-6, rtol=0)
    # bir's libjpeg convention is a different codec on the same input (tables and padding)
    assert (DiffJPEG(differentiable=differentiable)(x, quality) - ref).abs().max() > 0.2
    # compress_list (ragged) takes the same convention
    ragged = DiffJPEG(convention="basicsr").compress_list([x[:1], x[1:2, :, :33, :17]], quality[:2])
    single = DiffJPEG(convention="basicsr")(x[1:2, :, :33, :17], quality[1:2])
    torch.testing.assert_close(ragged[1], single, atol=1e-6, rtol=0)


def test_padding_option_zero_vs_edge():
    x = torch.full((1, 3, 20, 20), 0.8)
    edge = DiffJPEG(padding="edge")(x, torch.tensor([50]))
    zero = DiffJPEG(padding="zero")(x, torch.tensor([50]))
    # a flat image stays flat with edge padding; zeros beyond the border leak into the last MCU
    assert (edge - 0.8).abs().max() < 3 / 255
    assert (zero[..., 16:, 16:] - 0.8).abs().max() > 5 / 255
    torch.testing.assert_close(zero[..., :16, :16], edge[..., :16, :16], atol=1e-6, rtol=0)
    assert DiffJPEG(convention="basicsr").padding == "zero" and DiffJPEG().padding == "edge"


def test_basicsr_convention_rejects_quality_100_and_bad_options():
    with pytest.raises(ValueError, match="quality < 100"):
        DiffJPEG(convention="basicsr")(torch.rand(1, 3, 16, 16), torch.tensor([100.0]))
    with pytest.raises(ValueError, match="convention"):
        DiffJPEG(convention="opencv")
    with pytest.raises(ValueError, match="padding"):
        DiffJPEG(padding="reflect")
